/*
 * txjournal._speedups: C versions of the per-record hot paths of
 * txjournal.record, selected by that module when this extension imports.
 *
 *   decode_run    replay's bulk decoder (record._py_decode_run)
 *   frame_record  the engine's record framing (record._py_frame_record)
 *   crc32c        CRC-32C (Castagnoli) with the crc32c package's chaining
 *
 * The pure-Python functions in txjournal/record.py are the reference: these
 * must give exactly what they give for every input. To keep that promise
 * without reimplementing Python's corner cases (negative offsets counting
 * from the end, slices clipped at the end of the buffer, int subclasses
 * with their own arithmetic, keyword calls, struct.error for out-of-range
 * integers), each function handles the plain case -- the only one the
 * journal produces -- and hands anything else, arguments untouched, to the
 * Python reference. That slow path is exact by construction.
 *
 * Every length and offset read from the buffer is untrusted: each is
 * checked against the buffer before the bytes it covers are read, and the
 * arithmetic is arranged so that the checks themselves cannot overflow.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

/* The SSE4.2 path needs GCC or Clang (target attribute, cpu builtins) on
 * x86-64; elsewhere, or built with -DTXJ_NO_SSE42 (to check that the
 * portable build compiles cleanly), only the table-driven code exists. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(TXJ_NO_SSE42)
#  define TXJ_HAVE_SSE42 1
#  include <nmmintrin.h>
#endif

/* The record layout (see txjournal/record.py and docs/format.rst). */
#define PREFIX_SIZE 8      /* u32 length | u32 crc */
#define BODY_HEAD_SIZE 21  /* u64 seq | i64 time_ns | u16 version | u8 kind | u8 name_len | u8 user_len */
#define HEAD_ALL_SIZE (PREFIX_SIZE + BODY_HEAD_SIZE)
#define MAX_RECORD_SIZE (64 * 1024 * 1024)
#define MASK_DELTA 0xA282EAD8u

/* ---------------------------------------------------------------------------
 * Little-endian loads and stores, byte by byte so that they are right on any
 * host and any alignment (compilers turn them into single moves on x86).
 */

static inline uint32_t
load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16)
           | ((uint32_t)p[3] << 24);
}

static inline uint64_t
load_le64(const unsigned char *p)
{
    return (uint64_t)load_le32(p) | ((uint64_t)load_le32(p + 4) << 32);
}

static inline void
store_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void
store_le64(unsigned char *p, uint64_t v)
{
    store_le32(p, (uint32_t)v);
    store_le32(p + 4, (uint32_t)(v >> 32));
}

/* ---------------------------------------------------------------------------
 * CRC-32C. The update functions work on the inverted register; crc32c()
 * below does the inversions, which is what makes crc32c(b, crc32c(a, v))
 * equal crc32c(a + b, v), the crc32c package's chaining.
 */

#define CRC32C_POLY 0x82F63B78u  /* Castagnoli, reflected */

static uint32_t crc_table[8][256];

static void
crc_init_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8)
                              ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

/* Portable slicing-by-8: eight table lookups per eight bytes. */
static uint32_t
crc_update_portable(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint32_t lo = load_le32(p) ^ crc;
        uint32_t hi = load_le32(p + 4);
        crc = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF]
              ^ crc_table[5][(lo >> 16) & 0xFF] ^ crc_table[4][lo >> 24]
              ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF]
              ^ crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = crc_table[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#ifdef TXJ_HAVE_SSE42
/* SSE4.2's crc32 instruction computes exactly this polynomial. Compiled for
 * SSE4.2 whatever the build flags; only called if the CPU has it. */
__attribute__((target("sse4.2"))) static uint32_t
crc_update_sse42(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);  /* x86 is little-endian and allows unaligned loads */
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    if (n >= 4) {
        uint32_t v;
        memcpy(&v, p, 4);
        crc = _mm_crc32_u32(crc, v);
        p += 4;
        n -= 4;
    }
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

typedef uint32_t (*crc_update_fn)(uint32_t, const unsigned char *, size_t);

/* Chosen once at import. */
static crc_update_fn crc_update = crc_update_portable;

static inline uint32_t
crc32c(uint32_t value, const unsigned char *p, size_t n)
{
    return ~crc_update(~value, p, n);
}

/* LevelDB's mask: rotate right by 15, add a constant (record.mask). */
static inline uint32_t
mask_crc(uint32_t c)
{
    return ((c >> 15) | (c << 17)) + MASK_DELTA;
}

/* ---------------------------------------------------------------------------
 * The Python reference, for whatever the C paths do not take.
 */

static PyObject *record_module;  /* txjournal.record, imported on first need */
static PyObject *str_names;      /* interned attribute names */
static PyObject *str_py_decode_run;
static PyObject *str_py_frame_record;

/* An attribute of txjournal.record, looked up on every call as the Python
 * code looks up its globals (so a rebound record._names is seen). The import
 * is lazy: record imports this module, so it cannot be imported here at init. */
static PyObject *
record_attr(PyObject *name)
{
    if (record_module == NULL) {
        PyObject *module = PyImport_ImportModule("txjournal.record");
        if (module == NULL)
            return NULL;
        /* The import may let another thread run and get here first. */
        if (record_module == NULL)
            record_module = module;
        else
            Py_DECREF(module);
    }
    return PyObject_GetAttr(record_module, name);
}

static PyObject *
call_reference(PyObject *name, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *func = record_attr(name);
    if (func == NULL)
        return NULL;
    PyObject *result = PyObject_Vectorcall(func, args, (size_t)nargs, kwnames);
    Py_DECREF(func);
    return result;
}

/* Map a vectorcall's positional and keyword arguments onto the n parameters
 * named in `names`. Returns 0 when the call is not a plain complete one
 * (missing, unknown or repeated arguments): the Python reference then
 * raises the TypeError Python would. */
static int
gather_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
            const char *const *names, Py_ssize_t n, PyObject **out)
{
    if (nargs > n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        out[i] = i < nargs ? args[i] : NULL;
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            Py_ssize_t j = 0;
            while (j < n && PyUnicode_CompareWithASCIIString(key, names[j]) != 0)
                j++;
            if (j == n || out[j] != NULL)
                return 0;
            out[j] = args[nargs + k];
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (out[i] == NULL)
            return 0;
    return 1;
}

/* ---------------------------------------------------------------------------
 * decode_run
 */

/* Names and users seen in this call: replay meets the same few over and
 * over, and comparing raw bytes here is much cheaper than building a bytes
 * key per record to look up in record._names. Valid for one call only, in
 * which no Python code runs that could change _names (bar a finalizer run
 * by the collector: the entries hold references, so that is still safe). */
#define NAME_CACHE_SIZE 16

typedef struct {
    PyObject *key[NAME_CACHE_SIZE];    /* bytes, owned */
    PyObject *value[NAME_CACHE_SIZE];  /* the str _names maps it to, owned */
    int used;
    int next;  /* the entry to replace once all are used */
} name_cache;

static void
name_cache_clear(name_cache *cache)
{
    for (int i = 0; i < cache->used; i++) {
        Py_DECREF(cache->key[i]);
        Py_DECREF(cache->value[i]);
    }
    cache->used = 0;
}

/* The str that record._names maps these bytes to, as a new reference; NULL
 * with no error set if it maps them to nothing (or to None, which
 * ``names.get(...) is None`` cannot tell from nothing); NULL with an error
 * set if the lookup failed. */
static PyObject *
lookup_name(PyObject *names, name_cache *cache, const unsigned char *p, Py_ssize_t n)
{
    for (int i = 0; i < cache->used; i++) {
        PyObject *key = cache->key[i];
        if (PyBytes_GET_SIZE(key) == n && memcmp(PyBytes_AS_STRING(key), p, (size_t)n) == 0) {
            Py_INCREF(cache->value[i]);
            return cache->value[i];
        }
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)p, n);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(names, key);  /* borrowed */
    if (value == NULL || value == Py_None) {
        Py_DECREF(key);
        return NULL;
    }
    Py_INCREF(value);  /* the caller's */
    int slot;
    if (cache->used < NAME_CACHE_SIZE) {
        slot = cache->used++;
    }
    else {
        slot = cache->next;
        cache->next = (cache->next + 1) % NAME_CACHE_SIZE;
        Py_DECREF(cache->key[slot]);
        Py_DECREF(cache->value[slot]);
    }
    Py_INCREF(value);  /* the cache's */
    cache->key[slot] = key;
    cache->value[slot] = value;
    return value;
}

static PyObject *
pair(PyObject *first, PyObject *second)  /* steals both; NULL-safe */
{
    if (first == NULL || second == NULL) {
        Py_XDECREF(first);
        Py_XDECREF(second);
        return NULL;
    }
    PyObject *t = PyTuple_New(2);
    if (t == NULL) {
        Py_DECREF(first);
        Py_DECREF(second);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, first);
    PyTuple_SET_ITEM(t, 1, second);
    return t;
}

/* ([], offset) with the caller's very offset object, as Python returns it. */
static PyObject *
nothing_decoded(PyObject *offset_obj)
{
    Py_INCREF(offset_obj);
    return pair(PyList_New(0), offset_obj);
}

static const char *const decode_run_params[] = {
    "buf", "offset", "end", "salt_state", "length_states", "expected", "limit",
};

PyDoc_STRVAR(decode_run_doc,
"decode_run($module, buf, offset, end, salt_state, length_states, expected, limit)\n"
"--\n"
"\n"
"Decode consecutive records from ``offset``, the first of which must have\n"
"the sequence number ``expected``, in one tight loop: the bulk form of\n"
":func:`decode_fast` for replay. Return the records and the offset after\n"
"the last one. The records are plain tuples in the order of\n"
":class:`Record`'s fields (cheaper to build); ``Record._make`` or\n"
"``tuple.__new__(Record, t)`` turns one into a :class:`Record`.\n"
"\n"
"It stops after ``limit`` records, at ``end``, and *before* the first\n"
"record that is not valid or not numbered next (including one that\n"
":func:`decode_fast` would pass to :func:`decode_at`): the caller decodes\n"
"that one with :func:`decode_at` for the exact error. ``salt_state`` comes\n"
"from :func:`salt_crc`; ``length_states`` caches the checksum state after\n"
"salt and length (one dict per salt, filled here).\n"
"\n"
"This is the C version of ``txjournal.record._py_decode_run``, which is the\n"
"reference: for the same buffer and bounds the results are the same. It\n"
"neither uses nor fills ``length_states`` (the state after the length\n"
"costs less to compute than to look up). Anything but plain arguments\n"
"(``bytes``, ``int``, ``dict``, 0 <= offset, end <= len(buf)) is passed to\n"
"the reference.");

static PyObject *
speedups_decode_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                    PyObject *kwnames)
{
    PyObject *a[7];
    if (!gather_args(args, nargs, kwnames, decode_run_params, 7, a))
        goto reference;
    PyObject *buf = a[0], *offset_obj = a[1], *end_obj = a[2], *salt_obj = a[3];
    PyObject *states = a[4], *expected_obj = a[5], *limit_obj = a[6];
    /* Exact types only: subclasses may redefine the arithmetic and
     * comparisons the Python loop does with these, or dict.get. */
    if (!PyBytes_CheckExact(buf) || !PyLong_CheckExact(offset_obj) || !PyLong_CheckExact(end_obj)
        || !PyLong_Check(salt_obj) || !PyDict_CheckExact(states)
        || !PyLong_CheckExact(expected_obj) || !PyLong_CheckExact(limit_obj))
        goto reference;

    /* `expected < expected + limit` fails at once for limit <= 0, and the
     * loop runs at most `limit` times: count records rather than compare
     * sequence numbers, so `expected` cannot overflow into the test. */
    int overflow;
    long long limit = PyLong_AsLongLongAndOverflow(limit_obj, &overflow);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    if (overflow > 0)
        limit = LLONG_MAX;
    if (overflow < 0 || limit <= 0)
        return nothing_decoded(offset_obj);

    /* Each conversion checked before the next: no C-API call with an
     * exception pending. */
    Py_ssize_t offset = PyLong_AsSsize_t(offset_obj);
    Py_ssize_t end = offset == -1 && PyErr_Occurred() ? -1 : PyLong_AsSsize_t(end_obj);
    if (end == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        goto reference;  /* offsets beyond Py_ssize_t */
    }
    Py_ssize_t size = PyBytes_GET_SIZE(buf);
    /* A negative offset counts from the end of buf in struct.unpack_from and
     * slices; an end beyond buf lets slices come out short. Both are the
     * reference's business. From here on 0 <= offset and end <= size. */
    if (offset < 0 || end > size)
        goto reference;
    /* The loop test `offset <= end - 29`, written so that it cannot overflow:
     * with end < 29 it fails for every offset >= 0. */
    if (end < HEAD_ALL_SIZE || offset > end - HEAD_ALL_SIZE)
        return nothing_decoded(offset_obj);

    /* Sequence numbers are u64: an `expected` outside that range matches no
     * record, so the loop would stop at the first one. */
    unsigned long long expected = PyLong_AsUnsignedLongLong(expected_obj);
    if (expected == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        return nothing_decoded(offset_obj);
    }
    /* crc32c(data, value) takes value modulo 2**32, as this does. */
    uint32_t salt_state = (uint32_t)PyLong_AsUnsignedLongMask(salt_obj);
    if (salt_state == (uint32_t)-1 && PyErr_Occurred())
        return NULL;

    PyObject *names = record_attr(str_names);
    if (names == NULL)
        return NULL;
    if (!PyDict_CheckExact(names)) {
        Py_DECREF(names);
        goto reference;
    }

    const unsigned char *b = (const unsigned char *)PyBytes_AS_STRING(buf);
    PyObject *records = PyList_New(0);
    if (records == NULL) {
        Py_DECREF(names);
        return NULL;
    }
    name_cache cache;
    cache.used = 0;
    cache.next = 0;
    long long count = 0;
    int more = 1;  /* 0 once `expected` has passed the largest u64 */

    /* Invariant: 0 <= offset <= end - 29 <= size - 29, so the 29 bytes of
     * prefix and body head at offset are inside buf. */
    while (count < limit && more && offset <= end - HEAD_ALL_SIZE) {
        const unsigned char *p = b + offset;
        uint32_t length = load_le32(p);
        uint32_t crc = load_le32(p + 4);
        uint64_t seq = load_le64(p + 8);
        uint64_t time_bits = load_le64(p + 16);
        unsigned int version = (unsigned int)p[24] | ((unsigned int)p[25] << 8);
        unsigned int kind = p[26];
        Py_ssize_t name_len = p[27];
        Py_ssize_t user_len = p[28];

        if (seq != expected)
            break;
        /* The length is untrusted. Bound it before any arithmetic: then
         * `end - offset - 8` (>= 21, no overflow) bounds the body, and
         * start + length <= end cannot overflow either. */
        if (length < BODY_HEAD_SIZE || length > MAX_RECORD_SIZE
            || (Py_ssize_t)length > end - offset - PREFIX_SIZE)
            break;
        Py_ssize_t start = offset + PREFIX_SIZE;
        Py_ssize_t stop = start + (Py_ssize_t)length;  /* <= end <= size */

        /* salt | length | body: the length's 4 bytes are the first 4 at p. */
        uint32_t c = crc_update(~salt_state, p, 4);
        c = ~crc_update(c, b + start, length);
        if (mask_crc(c) != crc)
            break;

        /* The name and user lengths are untrusted too: both (at most 255
         * each) must end inside this record's body, else they would take
         * bytes of the next record. */
        Py_ssize_t at = start + BODY_HEAD_SIZE;
        Py_ssize_t q = at + name_len + user_len;
        if (q > stop)
            break;
        PyObject *name = lookup_name(names, &cache, b + at, name_len);
        if (name == NULL) {
            if (PyErr_Occurred())
                goto error;
            break;
        }
        PyObject *user;
        if (user_len) {
            user = lookup_name(names, &cache, b + at + name_len, user_len);
            if (user == NULL) {
                Py_DECREF(name);
                if (PyErr_Occurred())
                    goto error;
                break;
            }
        }
        else {
            user = Py_None;
            Py_INCREF(user);
        }

        int64_t time_ns;
        memcpy(&time_ns, &time_bits, sizeof time_ns);  /* two's complement i64 */
        PyObject *record = PyTuple_New(7);
        PyObject *o_seq = PyLong_FromUnsignedLongLong(seq);
        PyObject *o_time = PyLong_FromLongLong(time_ns);
        PyObject *o_version = PyLong_FromLong((long)version);
        PyObject *o_kind = PyLong_FromLong((long)kind);
        PyObject *o_fields = PyBytes_FromStringAndSize((const char *)b + q, stop - q);
        if (record == NULL || o_seq == NULL || o_time == NULL || o_version == NULL
            || o_kind == NULL || o_fields == NULL) {
            Py_XDECREF(record);
            Py_XDECREF(o_seq);
            Py_XDECREF(o_time);
            Py_XDECREF(o_version);
            Py_XDECREF(o_kind);
            Py_XDECREF(o_fields);
            Py_DECREF(name);
            Py_DECREF(user);
            goto error;
        }
        PyTuple_SET_ITEM(record, 0, o_seq);
        PyTuple_SET_ITEM(record, 1, o_time);
        PyTuple_SET_ITEM(record, 2, name);
        PyTuple_SET_ITEM(record, 3, o_version);
        PyTuple_SET_ITEM(record, 4, o_kind);
        PyTuple_SET_ITEM(record, 5, user);
        PyTuple_SET_ITEM(record, 6, o_fields);
        int failed = PyList_Append(records, record);
        Py_DECREF(record);
        if (failed)
            goto error;

        count++;
        if (expected == UINT64_MAX)
            more = 0;  /* the next expected, 2**64, is no record's */
        else
            expected++;
        offset = stop;
    }

    name_cache_clear(&cache);
    Py_DECREF(names);
    if (count == 0) {
        Py_DECREF(records);
        return nothing_decoded(offset_obj);
    }
    return pair(records, PyLong_FromSsize_t(offset));

error:
    name_cache_clear(&cache);
    Py_DECREF(names);
    Py_DECREF(records);
    return NULL;

reference:
    return call_reference(str_py_decode_run, args, nargs, kwnames);
}

/* ---------------------------------------------------------------------------
 * frame_record
 */

static const char *const frame_record_params[] = {
    "seq", "time_ns", "rest", "payload", "salt_state",
};

PyDoc_STRVAR(frame_record_doc,
"frame_record($module, seq, time_ns, rest, payload, salt_state)\n"
"--\n"
"\n"
"Frame one record whose body is ``seq``, ``time_ns``, then ``rest`` (the\n"
"rest of the body head, name and user) and ``payload``: the engine's hot\n"
"path, in one allocation.\n"
"\n"
"This is the C version of ``txjournal.record._py_frame_record``, which is\n"
"the reference. Anything but plain arguments (``int``, ``bytes``, numbers\n"
"in range) is passed to the reference, which raises what it raises\n"
"(``struct.error`` for a number out of range).");

static PyObject *
speedups_frame_record(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    PyObject *a[5];
    if (!gather_args(args, nargs, kwnames, frame_record_params, 5, a))
        goto reference;
    PyObject *seq_obj = a[0], *time_obj = a[1], *rest = a[2], *payload = a[3], *salt_obj = a[4];
    if (!PyLong_CheckExact(seq_obj) || !PyLong_CheckExact(time_obj) || !PyBytes_CheckExact(rest)
        || !PyBytes_CheckExact(payload) || !PyLong_Check(salt_obj))
        goto reference;

    /* seq is a u64 and time_ns an i64 in the record: out of range, struct
     * raises struct.error, so leave those to the reference. */
    unsigned long long seq = PyLong_AsUnsignedLongLong(seq_obj);
    if (seq == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();
        goto reference;
    }
    int overflow;
    long long time_ns = PyLong_AsLongLongAndOverflow(time_obj, &overflow);
    if (time_ns == -1 && PyErr_Occurred())
        return NULL;
    if (overflow)
        goto reference;
    uint32_t salt_state = (uint32_t)PyLong_AsUnsignedLongMask(salt_obj);
    if (salt_state == (uint32_t)-1 && PyErr_Occurred())
        return NULL;

    /* The body's length must fit the u32 length field (the reference's
     * struct.pack refuses it otherwise) and the whole record a bytes object.
     * In 64 bits the sum cannot overflow: each size is below 2**63. */
    Py_ssize_t rest_len = PyBytes_GET_SIZE(rest);
    Py_ssize_t payload_len = PyBytes_GET_SIZE(payload);
    uint64_t body_len = 16 + (uint64_t)rest_len + (uint64_t)payload_len;
    if (body_len > UINT32_MAX || body_len + PREFIX_SIZE > (uint64_t)PY_SSIZE_T_MAX)
        goto reference;

    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(body_len + PREFIX_SIZE));
    if (out == NULL)
        return NULL;
    unsigned char *d = (unsigned char *)PyBytes_AS_STRING(out);
    unsigned char *body = d + PREFIX_SIZE;
    store_le64(body, (uint64_t)seq);
    store_le64(body + 8, (uint64_t)time_ns);  /* two's complement, as struct packs "q" */
    memcpy(body + 16, PyBytes_AS_STRING(rest), (size_t)rest_len);
    memcpy(body + 16 + rest_len, PyBytes_AS_STRING(payload), (size_t)payload_len);
    store_le32(d, (uint32_t)body_len);
    uint32_t c = crc_update(~salt_state, d, 4);  /* salt | length | body */
    c = ~crc_update(c, body, (size_t)body_len);
    store_le32(d + 4, mask_crc(c));
    return out;

reference:
    return call_reference(str_py_frame_record, args, nargs, kwnames);
}

/* ---------------------------------------------------------------------------
 * crc32c
 */

PyDoc_STRVAR(crc32c_doc,
"crc32c($module, data, value=0, /)\n"
"--\n"
"\n"
"The CRC-32C of ``data`` continuing from ``value``, as the crc32c\n"
"package's ``crc32c(data, value)``: ``crc32c(b, crc32c(a))`` is\n"
"``crc32c(a + b)``. ``value`` is taken modulo 2**32.");

PyDoc_STRVAR(crc32c_portable_doc,
"_crc32c_portable($module, data, value=0, /)\n"
"--\n"
"\n"
":func:`crc32c` by the table-driven code that CPUs without SSE4.2 run,\n"
"whatever this one has: for tests.");

static PyObject *
crc32c_with(crc_update_fn update, PyObject *args)
{
    Py_buffer data;
    PyObject *value_obj = NULL;
    if (!PyArg_ParseTuple(args, "y*|O!", &data, &PyLong_Type, &value_obj))
        return NULL;
    uint32_t value = 0;
    if (value_obj != NULL) {
        value = (uint32_t)PyLong_AsUnsignedLongMask(value_obj);
        if (value == (uint32_t)-1 && PyErr_Occurred()) {
            PyBuffer_Release(&data);
            return NULL;
        }
    }
    uint32_t c = ~update(~value, (const unsigned char *)data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(c);
}

static PyObject *
speedups_crc32c(PyObject *Py_UNUSED(module), PyObject *args)
{
    return crc32c_with(crc_update, args);
}

static PyObject *
speedups_crc32c_portable(PyObject *Py_UNUSED(module), PyObject *args)
{
    return crc32c_with(crc_update_portable, args);
}

/* ---------------------------------------------------------------------------
 * apply_run: replay's inner loop (see txjournal/replaying.py, whose
 * _py_apply_run is the reference this must agree with).
 */

static PyObject *str_execute;   /* "execute", interned */
static PyObject *empty_tuple;

PyDoc_STRVAR(apply_run_doc,
"apply_run(records, start, plan, context, journal_id, model, unpackb)\n"
"--\n"
"\n"
"Apply ``records[start:]`` in order while each is a plain case; return the\n"
"index of the first one that is not and the list of ``(seq, name,\n"
"exception)`` the commands applied raised, or ``None``. See\n"
":func:`txjournal.replaying._py_apply_run`, the reference: for records as\n"
"``decode_run`` returns them the results are the same. Arguments no caller\n"
"passes may be met differently: a negative start is refused here, and a\n"
"record that is not a 7-tuple ends the run before it (for the slow path).");

static PyObject *
speedups_apply_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "apply_run() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *records = args[0], *plan = args[2], *context = args[3];
    PyObject *journal_id = args[4], *model = args[5], *unpackb = args[6];
    if (!PyList_CheckExact(records) || !PyDict_CheckExact(plan)) {
        PyErr_SetString(PyExc_TypeError, "apply_run() needs a list of records and a dict plan");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0) {
        PyErr_SetString(PyExc_ValueError, "apply_run() start must not be negative");
        return NULL;
    }
    PyObject *raised = NULL;  /* a list, created on the first exception */

    /* The list may change under us (a command's code could reach it): read
     * its length and items afresh each time, holding a reference to the
     * record while it is used. */
    while (i < PyList_GET_SIZE(records)) {
        PyObject *record = PyList_GET_ITEM(records, i);
        if (!PyTuple_CheckExact(record) || PyTuple_GET_SIZE(record) != 7)
            break;  /* not decode_run's: the slow path says what it is */
        Py_INCREF(record);
        PyObject *seq = PyTuple_GET_ITEM(record, 0);
        PyObject *time_ns = PyTuple_GET_ITEM(record, 1);
        PyObject *name = PyTuple_GET_ITEM(record, 2);
        PyObject *version = PyTuple_GET_ITEM(record, 3);
        PyObject *kind = PyTuple_GET_ITEM(record, 4);
        PyObject *user = PyTuple_GET_ITEM(record, 5);
        PyObject *fields = PyTuple_GET_ITEM(record, 6);

        /* kind: 1 a command, 2 a query audit record (skipped), else stop.
         * Exact ints only, as decode_run makes them. */
        if (!PyLong_CheckExact(kind)) {
            Py_DECREF(record);
            break;
        }
        long k = PyLong_AsLong(kind);
        if (k == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            Py_DECREF(record);
            break;
        }
        if (k != 1) {
            Py_DECREF(record);
            if (k == 2) {
                i++;
                continue;
            }
            break;
        }

        /* The plan: name -> (class, version), the version equal. */
        PyObject *entry = PyDict_GetItemWithError(plan, name);  /* borrowed */
        if (entry == NULL) {
            Py_DECREF(record);
            if (PyErr_Occurred())
                goto error;
            break;
        }
        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) {
            Py_DECREF(record);
            break;
        }
        Py_INCREF(entry);
        int same = PyObject_RichCompareBool(PyTuple_GET_ITEM(entry, 1), version, Py_EQ);
        if (same != 1) {
            Py_DECREF(entry);
            Py_DECREF(record);
            if (same < 0)
                goto error;
            break;
        }

        /* Fields: a map, else the slow path decodes (and words the error). */
        PyObject *values = PyObject_Vectorcall(unpackb, &fields, 1, NULL);
        if (values == NULL) {
            Py_DECREF(entry);
            Py_DECREF(record);
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                goto error;  /* KeyboardInterrupt and the like go up */
            PyErr_Clear();
            break;
        }
        if (!PyDict_CheckExact(values)) {
            Py_DECREF(values);
            Py_DECREF(entry);
            Py_DECREF(record);
            break;
        }
        PyObject *command = PyObject_Call(PyTuple_GET_ITEM(entry, 0), empty_tuple, values);
        Py_DECREF(values);
        Py_DECREF(entry);
        if (command == NULL) {
            Py_DECREF(record);
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                goto error;
            PyErr_Clear();
            break;  /* the slow path builds it again and reports why */
        }

        PyObject *ctx_args[4] = {seq, time_ns, journal_id, user};
        PyObject *ctx = PyObject_Vectorcall(context, ctx_args, 4, NULL);
        PyObject *result = NULL;
        if (ctx != NULL) {
            PyObject *call_args[3] = {command, model, ctx};
            result = PyObject_VectorcallMethod(
                str_execute, call_args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            Py_DECREF(ctx);
        }
        Py_DECREF(command);
        if (result != NULL) {
            Py_DECREF(result);
        }
        else {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_DECREF(record);
                goto error;
            }
            /* Part of history: the live run failed the same way. Keep the
             * exception, as `except Exception as e` would (normalized,
             * with its traceback). */
            PyObject *type, *value, *traceback;
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            if (traceback != NULL && value != NULL)
                PyException_SetTraceback(value, traceback);
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            if (value == NULL) {
                Py_DECREF(record);
                PyErr_SetString(PyExc_SystemError, "apply_run: lost an exception");
                goto error;
            }
            if (raised == NULL) {
                raised = PyList_New(0);
                if (raised == NULL) {
                    Py_DECREF(value);
                    Py_DECREF(record);
                    goto error;
                }
            }
            PyObject *item = PyTuple_Pack(3, seq, name, value);
            Py_DECREF(value);
            if (item == NULL || PyList_Append(raised, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(record);
                goto error;
            }
            Py_DECREF(item);
        }
        Py_DECREF(record);
        i++;
    }

    PyObject *index = PyLong_FromSsize_t(i);
    if (index == NULL)
        goto error;
    if (raised == NULL) {
        raised = Py_None;
        Py_INCREF(raised);
    }
    PyObject *out = PyTuple_Pack(2, index, raised);
    Py_DECREF(index);
    Py_DECREF(raised);
    return out;

error:
    Py_XDECREF(raised);
    return NULL;
}

/* ---------------------------------------------------------------------------
 * The module
 */

static PyMethodDef speedups_methods[] = {
    {"decode_run", (PyCFunction)(void (*)(void))speedups_decode_run,
     METH_FASTCALL | METH_KEYWORDS, decode_run_doc},
    {"frame_record", (PyCFunction)(void (*)(void))speedups_frame_record,
     METH_FASTCALL | METH_KEYWORDS, frame_record_doc},
    {"apply_run", (PyCFunction)(void (*)(void))speedups_apply_run, METH_FASTCALL, apply_run_doc},
    {"crc32c", speedups_crc32c, METH_VARARGS, crc32c_doc},
    {"_crc32c_portable", speedups_crc32c_portable, METH_VARARGS, crc32c_portable_doc},
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(speedups_doc,
"C versions of the per-record hot paths of :mod:`txjournal.record`.\n"
"\n"
":mod:`txjournal.record` uses them unless this fails to import or the\n"
"environment variable ``TXJOURNAL_PURE_PYTHON`` is set; its pure-Python\n"
"functions are the reference these must agree with.");

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "txjournal._speedups",
    speedups_doc,
    -1,
    speedups_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    crc_init_tables();
    int hardware = 0;
#ifdef TXJ_HAVE_SSE42
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) {
        crc_update = crc_update_sse42;
        hardware = 1;
    }
#endif
    str_names = PyUnicode_InternFromString("_names");
    str_py_decode_run = PyUnicode_InternFromString("_py_decode_run");
    str_py_frame_record = PyUnicode_InternFromString("_py_frame_record");
    str_execute = PyUnicode_InternFromString("execute");
    empty_tuple = PyTuple_New(0);
    if (str_names == NULL || str_py_decode_run == NULL || str_py_frame_record == NULL
        || str_execute == NULL || empty_tuple == NULL)
        return NULL;
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL)
        return NULL;
    PyObject *flag = PyBool_FromLong(hardware);
    if (PyModule_AddObject(module, "HARDWARE_CRC32C", flag) < 0) {  /* steals on success */
        Py_DECREF(flag);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
