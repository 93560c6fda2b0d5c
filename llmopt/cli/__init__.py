"""The `llmopt` command: one module per subcommand, each thin (parse, call, render)."""
