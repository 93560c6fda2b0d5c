// The native tokenizers over a compact vocabulary (llmopt/vocab/spm_file.py writes it):
// the token texts in one blob and a flag byte per token, plus a score per token
// (SentencePiece kind) or the merge list (byte-level kind). Both share the hash table of
// texts, the added-token split and the heap-driven merge loop.
//
// The SentencePiece kind reproduces the Hugging Face `tokenizers` pipeline that transformers builds from a
// GGUF SentencePiece vocabulary, because that is the reference the project follows:
//   1. the added tokens (flag SPM_ADDED) are cut out of the raw text first, leftmost
//      match first and the longest one there (aho-corasick's LeftmostLongest);
//   2. every other stretch has ' ' replaced by U+2581 and starts as one symbol per
//      character; a character outside the vocabulary becomes its bytes' <0xXX> tokens
//      (or the unknown token), which never merge;
//   3. the adjacent pair whose concatenation is a token merges, best first. transformers
//      ranks the merges by the merged token's score (higher first), then the longer left
//      part, then the merged token's id; a rank that occurs twice merges leftmost first.
// A heap of candidate pairs keeps that O(n log n) in the text's length.
//
// Decoding follows the Replace(U+2581 -> ' '), ByteFallback, Fuse decoders: a run of byte
// tokens becomes its UTF-8 text, or one U+FFFD per byte if the run is not valid UTF-8.
//
// The byte-level kind (GPT-2 style, a GGUF "gpt2" vocabulary) reproduces the `tokenizers`
// BPE that llmopt/loader/gguf_tokenizer.py builds: the same added-token split, then the
// pre-tokenizer's pieces (cut in Python with the `regex` package, which has the Unicode
// categories the patterns need) each start as one symbol per byte and merge by the rank of
// the (left id, right id) pair, lowest first, the leftmost of equal ranks first. Its blob
// holds the tokens' raw bytes (GPT-2's byte-to-character mapping undone when written), so
// decoding is concatenation; Python reads the result as UTF-8 with replacement, which is
// what the ByteLevel decoder does.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SPM_ADDED 1u   // matched whole in the raw text before BPE
#define SPM_SPECIAL 2u // left out of decoded text
#define SPM_SHADOWED 8u // a later token has its text: decodes to nothing (see spm_file.py)
#define KIND_SPM 0u
#define KIND_BYTE_LEVEL 1u
#define SPM_NONE 0xFFFFFFFFu
#define SPM_MAX_ADDED_LENS 256

// Laid out as llmopt/vocab/spm.py's ctypes mirror of it: keep the two in step.
typedef struct {
    uint32_t n;               // tokens
    uint32_t mask;            // hash table size - 1 (a power of two)
    uint32_t unk;             // the unknown token, or SPM_NONE
    uint32_t n_added_lens;    // entries of added_lens in use
    const uint8_t *blob;      // token texts, back to back
    const uint32_t *offsets;  // n + 1: token i is blob[offsets[i]:offsets[i + 1]]
    const float *scores;      // merge priority of the token a pair merges into
    const uint8_t *flags;     // SPM_ADDED | SPM_SPECIAL
    uint32_t *table;          // open addressing: token ids, SPM_NONE where empty
    uint32_t byte_ids[256];   // <0xXX> token of each byte, or SPM_NONE
    uint32_t added_lens[SPM_MAX_ADDED_LENS]; // distinct byte lengths of added tokens, longest first
    uint8_t added_first[256]; // 1 where some added token starts with this byte
    uint32_t kind;            // KIND_SPM or KIND_BYTE_LEVEL
    uint32_t n_merges;        // byte-level: merges, by rank
    uint32_t merge_mask;      // byte-level: merge table size - 1 (a power of two)
    const uint32_t *merges;   // byte-level: (left id, right id, merged id) of each rank
    uint32_t *merge_table;    // byte-level: open addressing: ranks, SPM_NONE where empty
} SpmModel;

static uint32_t hash_bytes(const uint8_t *s, size_t len) {
    uint32_t h = 2166136261u; // FNV-1a: short keys, cheap and well spread
    for (size_t i = 0; i < len; i++) h = (h ^ s[i]) * 16777619u;
    return h;
}

static inline uint32_t token_len(const SpmModel *m, uint32_t id) {
    return m->offsets[id + 1] - m->offsets[id];
}

static uint32_t find(const SpmModel *m, const uint8_t *s, size_t len) {
    for (uint32_t h = hash_bytes(s, len) & m->mask;; h = (h + 1) & m->mask) {
        uint32_t id = m->table[h];
        if (id == SPM_NONE) return SPM_NONE;
        if (token_len(m, id) == len && memcmp(m->blob + m->offsets[id], s, len) == 0) return id;
    }
}

int64_t spm_find(const SpmModel *m, const uint8_t *s, int64_t len) {
    uint32_t id = find(m, s, (size_t)len);
    return id == SPM_NONE ? -1 : (int64_t)id;
}

static int hex_digit(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// The byte a <0xXX> token stands for, or -1. The decoder reads any 6-byte "<0x..>" text
// with Rust's u8::from_str_radix, which also takes a leading '+': so do we.
static int byte_of_token(const uint8_t *t, uint32_t len) {
    if (len != 6 || t[0] != '<' || t[1] != '0' || t[2] != 'x' || t[5] != '>') return -1;
    int lo = hex_digit(t[4]);
    if (lo < 0) return -1;
    if (t[3] == '+') return lo;
    int hi = hex_digit(t[3]);
    return hi < 0 ? -1 : hi * 16 + lo;
}

static inline uint32_t hash_pair(uint32_t left, uint32_t right) {
    uint64_t k = ((uint64_t)left << 32 | right) * 0x9E3779B97F4A7C15ull; // Fibonacci hashing
    return (uint32_t)(k >> 32);
}

// The rank of the merge of (left, right), or SPM_NONE.
static inline uint32_t find_merge(const SpmModel *m, uint32_t left, uint32_t right) {
    for (uint32_t h = hash_pair(left, right) & m->merge_mask;; h = (h + 1) & m->merge_mask) {
        uint32_t rank = m->merge_table[h];
        if (rank == SPM_NONE) return rank;
        if (m->merges[3 * rank] == left && m->merges[3 * rank + 1] == right) return rank;
    }
}

// Fills the merge table (all SPM_NONE on entry). A pair listed twice keeps its later rank,
// as the Rust HashMap `tokenizers` collects the merges into does.
static void index_merges(SpmModel *m) {
    for (uint32_t rank = 0; rank < m->n_merges; rank++) {
        uint32_t left = m->merges[3 * rank], right = m->merges[3 * rank + 1];
        uint32_t h = hash_pair(left, right) & m->merge_mask;
        while (m->merge_table[h] != SPM_NONE && !(m->merges[3 * m->merge_table[h]] == left &&
                                                  m->merges[3 * m->merge_table[h] + 1] == right))
            h = (h + 1) & m->merge_mask;
        m->merge_table[h] = rank;
    }
}

// Fills the hash tables (all SPM_NONE on entry), the SentencePiece kind's byte tokens (the
// byte-level kind's come with its file) and the added tokens' first bytes and lengths. 0,
// or -1 when the added tokens have too many distinct lengths.
int32_t spm_index(SpmModel *m) {
    uint8_t seen_len[SPM_MAX_ADDED_LENS * 16] = {0};
    uint32_t longest = 0;
    int spm = m->kind == KIND_SPM;
    if (spm)
        for (int b = 0; b < 256; b++) m->byte_ids[b] = SPM_NONE;
    else
        index_merges(m);
    memset(m->added_first, 0, sizeof m->added_first);
    for (uint32_t id = 0; id < m->n; id++) {
        const uint8_t *s = m->blob + m->offsets[id];
        uint32_t len = token_len(m, id);
        uint32_t h = hash_bytes(s, len) & m->mask;
        // A text spelled twice maps to its last id, as a Python dict built in order does.
        while (m->table[h] != SPM_NONE &&
               !(token_len(m, m->table[h]) == len && memcmp(m->blob + m->offsets[m->table[h]], s, len) == 0))
            h = (h + 1) & m->mask;
        m->table[h] = id;
        // The encoder falls back on the tokens spelled "<0xXX>" exactly (upper-case digits).
        if (spm && len == 6 && byte_of_token(s, len) >= 0 && s[3] != '+' && !(s[3] >= 'a' && s[3] <= 'f') &&
            !(s[4] >= 'a' && s[4] <= 'f')) {
            int b = byte_of_token(s, len);
            if (m->byte_ids[b] == SPM_NONE) m->byte_ids[b] = id;
        }
        if ((m->flags[id] & SPM_ADDED) && len > 0) {
            if (len >= sizeof seen_len) return -1;
            m->added_first[s[0]] = 1;
            seen_len[len] = 1;
            if (len > longest) longest = len;
        }
    }
    m->n_added_lens = 0;
    for (uint32_t len = longest; len > 0; len--) {
        if (!seen_len[len]) continue;
        if (m->n_added_lens == SPM_MAX_ADDED_LENS) return -1;
        m->added_lens[m->n_added_lens++] = len;
    }
    return 0;
}

typedef struct {
    uint32_t start, len; // bytes in the normalized stretch; len 0: merged into its left
    uint32_t id, chars;
    int32_t prev, next;
    int mergeable;
} Symbol;

typedef struct {
    float score;
    uint32_t left_chars, id, pos; // pos: the left symbol's index (index order is text order)
    uint32_t left_len, right_len; // the pair as it was: a changed symbol makes it stale
} Candidate;

// Whether candidate a merges before b.
static inline int before(const Candidate *a, const Candidate *b) {
    if (a->score != b->score) return a->score > b->score;
    if (a->left_chars != b->left_chars) return a->left_chars > b->left_chars;
    if (a->id != b->id) return a->id < b->id;
    return a->pos < b->pos;
}

static void heap_push(Candidate *heap, size_t *n, Candidate c) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(&c, &heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = c;
}

static Candidate heap_pop(Candidate *heap, size_t *n) {
    Candidate top = heap[0], last = heap[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= *n) break;
        if (child + 1 < *n && before(&heap[child + 1], &heap[child])) child++;
        if (!before(&heap[child], &last)) break;
        heap[i] = heap[child];
        i = child;
    }
    if (*n > 0) heap[i] = last;
    return top;
}

typedef struct {
    uint8_t *norm;    // the normalized stretch
    Symbol *symbols;
    Candidate *heap;
} Scratch;

// Fills c (but its pos) with the merge of adjacent symbols a and b; 0 where they do not merge.
typedef int (*PairFn)(const SpmModel *m, const Scratch *w, const Symbol *a, const Symbol *b, Candidate *c);

// SentencePiece: the pair merges where its text is a token, at that token's score.
static int text_pair(const SpmModel *m, const Scratch *w, const Symbol *a, const Symbol *b, Candidate *c) {
    if (!a->mergeable || !b->mergeable) return 0;
    uint32_t id = find(m, w->norm + a->start, (size_t)a->len + b->len);
    if (id == SPM_NONE) return 0;
    *c = (Candidate){m->scores[id], a->chars, id, 0, a->len, b->len};
    return 1;
}

// Byte-level: the pair of ids merges where the merge list has it. The candidates order by
// score, so the rank goes in negated (exact: the writer refuses 2^24 merges or more); one
// rank is one merged id and leaves the position to break ties, leftmost first, as the
// `tokenizers` BPE's queue does.
static int rank_pair(const SpmModel *m, const Scratch *w, const Symbol *a, const Symbol *b, Candidate *c) {
    (void)w;
    uint32_t rank = find_merge(m, a->id, b->id);
    if (rank == SPM_NONE) return 0;
    *c = (Candidate){-(float)rank, 0, m->merges[3 * rank + 2], 0, a->len, b->len};
    return 1;
}

static void try_pair(const SpmModel *m, Scratch *w, size_t *n_heap, int32_t left, PairFn pair) {
    if (left < 0) return;
    const Symbol *a = &w->symbols[left];
    if (a->next < 0) return;
    Candidate c;
    if (!pair(m, w, a, &w->symbols[a->next], &c)) return;
    c.pos = (uint32_t)left;
    heap_push(w->heap, n_heap, c);
}

// Merges the n_sym symbols (linked in text order from index 0), best candidate first, and
// appends the ids left to out. A candidate is stale when either symbol changed since it was
// pushed: a merge always changes a symbol's byte length.
static int64_t merge_symbols(const SpmModel *m, Scratch *w, int32_t n_sym, PairFn pair, int32_t *out) {
    if (n_sym == 0) return 0;
    w->symbols[n_sym - 1].next = -1;
    size_t n_heap = 0;
    for (int32_t i = 0; i + 1 < n_sym; i++) try_pair(m, w, &n_heap, i, pair);
    while (n_heap > 0) {
        Candidate c = heap_pop(w->heap, &n_heap);
        Symbol *a = &w->symbols[c.pos];
        if (a->len != c.left_len || a->next < 0) continue;
        Symbol *b = &w->symbols[a->next];
        if (b->len != c.right_len) continue;
        a->len += b->len;
        a->chars += b->chars;
        a->id = c.id;
        b->len = 0;
        a->next = b->next;
        if (b->next >= 0) w->symbols[b->next].prev = (int32_t)c.pos;
        try_pair(m, w, &n_heap, a->prev, pair);
        try_pair(m, w, &n_heap, (int32_t)c.pos, pair);
    }
    int64_t n_out = 0;
    for (int32_t i = 0; i >= 0; i = w->symbols[i].next) out[n_out++] = (int32_t)w->symbols[i].id;
    return n_out;
}

static int32_t add_symbol(Symbol *symbols, int32_t n, uint32_t start, uint32_t len, uint32_t id, int mergeable) {
    symbols[n] = (Symbol){start, len, id, 1, n - 1, n + 1, mergeable};
    return n + 1;
}

static size_t utf8_char_len(uint8_t lead) {
    if (lead < 0x80) return 1;
    if (lead >= 0xF0) return 4;
    if (lead >= 0xE0) return 3;
    if (lead >= 0xC0) return 2;
    return 1;
}

// SentencePiece BPE over text[0:len) (no added token inside); appends its ids to out.
static int64_t encode_stretch(const SpmModel *m, Scratch *w, const uint8_t *text, size_t len, int32_t *out) {
    size_t n_norm = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            w->norm[n_norm++] = 0xE2, w->norm[n_norm++] = 0x96, w->norm[n_norm++] = 0x81;
        } else {
            w->norm[n_norm++] = text[i];
        }
    }
    int32_t n_sym = 0;
    for (size_t i = 0; i < n_norm;) {
        size_t clen = utf8_char_len(w->norm[i]);
        if (clen > n_norm - i) clen = n_norm - i;
        uint32_t id = find(m, w->norm + i, clen);
        if (id != SPM_NONE) {
            n_sym = add_symbol(w->symbols, n_sym, (uint32_t)i, (uint32_t)clen, id, 1);
        } else {
            int all_bytes = 1;
            for (size_t k = 0; k < clen; k++) all_bytes &= m->byte_ids[w->norm[i + k]] != SPM_NONE;
            if (all_bytes) {
                for (size_t k = 0; k < clen; k++)
                    n_sym = add_symbol(w->symbols, n_sym, (uint32_t)(i + k), 1, m->byte_ids[w->norm[i + k]], 0);
            } else if (m->unk != SPM_NONE) {
                // Consecutive unknown characters fuse into one unknown token.
                Symbol *last = n_sym > 0 ? &w->symbols[n_sym - 1] : NULL;
                if (last && !last->mergeable && last->id == m->unk && last->start + last->len == i) {
                    last->len += (uint32_t)clen;
                } else {
                    n_sym = add_symbol(w->symbols, n_sym, (uint32_t)i, (uint32_t)clen, m->unk, 0);
                }
            }
        }
        i += clen;
    }
    // Dropped characters (no byte tokens, no unknown token) leave gaps in the text: a pair
    // across one must not merge, so those neighbours are not adjacent in the bytes.
    for (int32_t i = 0; i + 1 < n_sym; i++)
        if (w->symbols[i].start + w->symbols[i].len != w->symbols[i + 1].start)
            w->symbols[i].mergeable = w->symbols[i + 1].mergeable = 0;
    return merge_symbols(m, w, n_sym, text_pair, out);
}

// Byte-level BPE over one pre-tokenizer piece: a symbol per byte. A byte without a token
// is dropped and its neighbours become adjacent, as `tokenizers` builds its word.
static int64_t encode_piece(const SpmModel *m, Scratch *w, const uint8_t *text, size_t len, int32_t *out) {
    int32_t n_sym = 0;
    for (size_t i = 0; i < len; i++)
        if (m->byte_ids[text[i]] != SPM_NONE)
            n_sym = add_symbol(w->symbols, n_sym, (uint32_t)i, 1, m->byte_ids[text[i]], 1);
    return merge_symbols(m, w, n_sym, rank_pair, out);
}

// Where the next added token starts in text[pos:n) (n where none does), the leftmost and
// there the longest, as the aho-corasick LeftmostLongest search of `tokenizers` finds it.
static size_t next_added(const SpmModel *m, const uint8_t *text, size_t n, size_t pos, uint32_t *id,
                         uint32_t *len) {
    for (; pos < n; pos++) {
        if (!m->added_first[text[pos]]) continue;
        for (uint32_t k = 0; k < m->n_added_lens; k++) {
            uint32_t l = m->added_lens[k];
            if (l > n - pos) continue;
            uint32_t found = find(m, text + pos, l);
            if (found != SPM_NONE && (m->flags[found] & SPM_ADDED)) {
                *id = found, *len = l;
                return pos;
            }
        }
    }
    return n;
}

// The added tokens in text[0:len): their starts and ids into starts and ids (len entries
// each). Returns the count. The byte-level encoder cuts the stretches between them into
// pieces (in Python) before bpe_encode.
int64_t spm_added_tokens(const SpmModel *m, const uint8_t *text, int64_t len, int64_t *starts, int32_t *ids) {
    int64_t count = 0;
    uint32_t id = 0, l = 0;
    for (size_t pos = 0, n = (size_t)len; (pos = next_added(m, text, n, pos, &id, &l)) < n; pos += l) {
        starts[count] = (int64_t)pos, ids[count++] = (int32_t)id;
    }
    return count;
}

static int scratch_alloc(Scratch *w, size_t norm_len, size_t n_symbols) {
    // A merge adds at most two candidates and removes a symbol.
    w->norm = norm_len ? malloc(norm_len) : NULL;
    w->symbols = malloc(n_symbols * sizeof(Symbol));
    w->heap = malloc(n_symbols * 3 * sizeof(Candidate));
    if ((norm_len && !w->norm) || !w->symbols || !w->heap) {
        free(w->norm), free(w->symbols), free(w->heap);
        return -1;
    }
    return 0;
}

static void scratch_free(Scratch *w) { free(w->norm), free(w->symbols), free(w->heap); }

// The ids of text[0:len) into out, which holds len entries (no text makes more ids than
// bytes). Returns the count, or -1 when memory runs out.
int64_t spm_encode(const SpmModel *m, const uint8_t *text, int64_t len, int32_t *out) {
    if (len <= 0) return 0;
    Scratch w;
    // Each byte is at most one symbol (a space grows to three bytes but stays one symbol).
    if (scratch_alloc(&w, (size_t)len * 3, (size_t)len) != 0) return -1;
    int64_t n_out = 0;
    size_t start = 0, n = (size_t)len;
    uint32_t match = 0, match_len = 0;
    for (size_t pos; (pos = next_added(m, text, n, start, &match, &match_len)) < n; start = pos + match_len) {
        n_out += encode_stretch(m, &w, text + start, pos - start, out + n_out);
        out[n_out++] = (int32_t)match;
    }
    n_out += encode_stretch(m, &w, text + start, n - start, out + n_out);
    scratch_free(&w);
    return n_out;
}

// The byte-level ids of text[0:len) into out (len entries), walking `pieces` in text
// order: an entry >= 0 is the byte length of a piece to merge, an entry < 0 the added
// token -1 - entry (its text's length in bytes). Returns the count, -1 when memory runs
// out, or -2 when the pieces overrun the text.
int64_t bpe_encode(const SpmModel *m, const uint8_t *text, int64_t len, const int32_t *pieces, int64_t n_pieces,
                   int32_t *out) {
    size_t longest = 1, at = 0;
    for (int64_t i = 0; i < n_pieces; i++) {
        size_t l = pieces[i] >= 0 ? (size_t)pieces[i] : 0;
        if (pieces[i] < 0) {
            uint32_t id = (uint32_t)(-1 - (int64_t)pieces[i]);
            if (id >= m->n) return -2;
            l = token_len(m, id);
        }
        if (l > longest) longest = l;
        at += l;
    }
    if (at > (size_t)len) return -2;
    Scratch w;
    if (scratch_alloc(&w, 0, longest) != 0) return -1;
    int64_t n_out = 0;
    at = 0;
    for (int64_t i = 0; i < n_pieces; i++) {
        if (pieces[i] < 0) {
            uint32_t id = (uint32_t)(-1 - (int64_t)pieces[i]);
            out[n_out++] = (int32_t)id;
            at += token_len(m, id);
        } else {
            n_out += encode_piece(m, &w, text + at, (size_t)pieces[i], out + n_out);
            at += (size_t)pieces[i];
        }
    }
    scratch_free(&w);
    return n_out;
}

// Length of the valid UTF-8 character at s[0:len), or 0 (Rust's from_utf8 rules: no
// overlong forms, no surrogates, nothing past U+10FFFF).
static size_t valid_char(const uint8_t *s, size_t len) {
    uint8_t c = s[0];
    if (c < 0x80) return 1;
    size_t need;
    uint8_t lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else return 0;
    if (len < need || s[1] < lo || s[1] > hi) return 0;
    for (size_t k = 2; k < need; k++)
        if (s[k] < 0x80 || s[k] > 0xBF) return 0;
    return need;
}

static size_t flush_bytes(const uint8_t *run, size_t n, uint8_t *out) {
    int valid = 1;
    for (size_t i = 0; i < n && valid;) {
        size_t l = valid_char(run + i, n - i);
        valid = l > 0;
        i += l;
    }
    if (valid) {
        memcpy(out, run, n);
        return n;
    }
    for (size_t i = 0; i < n; i++) out[3 * i] = 0xEF, out[3 * i + 1] = 0xBF, out[3 * i + 2] = 0xBD;
    return 3 * n;
}

// The byte GPT-2's byte-to-character alphabet spells as code point cp, or -1: the bytes
// '!'..'~', 0xA1..0xAC and 0xAE..0xFF are their own code points; the other 68, in byte
// order, are U+0100 onwards.
static int alphabet_byte(uint32_t cp) {
    if ((cp >= 0x21 && cp <= 0x7E) || (cp >= 0xA1 && cp <= 0xAC) || (cp >= 0xAE && cp <= 0xFF)) return (int)cp;
    if (cp < 0x100 || cp >= 0x100 + 68) return -1;
    uint32_t k = cp - 0x100; // 0x00..0x20 (33), 0x7F..0xA0 (34), 0xAD
    return k < 33 ? (int)k : k < 67 ? (int)(0x7F + k - 33) : 0xAD;
}

// An added token's text as the ByteLevel decoder writes it: the bytes its characters spell
// when all are in the alphabet, else the text itself. Returns the length written (at most
// len: every character of the alphabet is one byte or more in UTF-8).
static size_t byte_level_text(const uint8_t *t, uint32_t len, uint8_t *out) {
    size_t n = 0;
    for (uint32_t k = 0; k < len;) {
        size_t l = valid_char(t + k, len - k);
        if (l == 0) break;
        uint32_t cp = l == 1 ? t[k] : l == 2 ? (t[k] & 0x1Fu) << 6 | (t[k + 1] & 0x3Fu) : 0x110000;
        int b = alphabet_byte(cp);
        if (b < 0) break;
        out[n++] = (uint8_t)b, k += (uint32_t)l;
        if (k == len) return n;
    }
    memcpy(out, t, len);
    return len;
}

// The UTF-8 text of ids into out (cap bytes): byte-level vocabularies' may be invalid
// UTF-8 (a character cut between tokens), which the caller replaces. Ids outside the
// vocabulary are skipped, and special ones too with skip_special. Returns the length, -(the size needed) when cap is
// too small, or INT64_MIN when memory runs out.
int64_t spm_decode(const SpmModel *m, const int32_t *ids, int64_t n, int32_t skip_special, uint8_t *out,
                   int64_t cap) {
    int64_t need = 0;
    for (int64_t i = 0; i < n; i++)
        if (ids[i] >= 0 && (uint32_t)ids[i] < m->n) need += token_len(m, (uint32_t)ids[i]);
    if (need > cap) return -need;
    uint8_t *run = malloc(n > 0 ? (size_t)n : 1), *o = out; // the pending byte tokens' bytes
    if (!run) return INT64_MIN;
    size_t n_run = 0;
    for (int64_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= m->n) continue;
        uint32_t id = (uint32_t)ids[i];
        if (skip_special && (m->flags[id] & SPM_SPECIAL)) continue;
        if (m->flags[id] & SPM_SHADOWED) continue;
        const uint8_t *t = m->blob + m->offsets[id];
        uint32_t len = token_len(m, id);
        if (m->kind == KIND_BYTE_LEVEL) {
            // The blob holds the tokens' bytes (added tokens: their text, as matched).
            if (m->flags[id] & SPM_ADDED) {
                o += byte_level_text(t, len, o);
            } else {
                memcpy(o, t, len), o += len;
            }
            continue;
        }
        int b = byte_of_token(t, len);
        if (b >= 0) {
            run[n_run++] = (uint8_t)b;
            continue;
        }
        if (n_run) o += flush_bytes(run, n_run, o), n_run = 0;
        for (uint32_t k = 0; k < len;) {
            if (k + 3 <= len && t[k] == 0xE2 && t[k + 1] == 0x96 && t[k + 2] == 0x81) {
                *o++ = ' ', k += 3;
            } else {
                *o++ = t[k++];
            }
        }
    }
    if (n_run) o += flush_bytes(run, n_run, o);
    free(run);
    return o - out;
}
