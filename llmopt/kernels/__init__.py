"""Small native kernels, compiled on first use with the system C compiler and cached
under $LLMOPT_HOME/kernels. Every caller has a torch fallback for machines without a
compiler."""
