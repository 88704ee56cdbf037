/* sfive_ngxlua._speedups: the optional C accelerator of sfive_ngxlua.records.
 *
 * One call takes a list of blocks of lines (LineSplitter.feed_blocks, lines joined by "\n") or
 * of single lines and does, for every line of the common shape, what RecordParser._classify
 * does for it after the standard library's strict decoder: UTF-8 (strict, or with each invalid
 * byte read as U+FFFD), a flat JSON object exactly as json accepts it (duplicate keys: the last
 * wins), the fields, their types and ranges, the status, url-truncated, the URL's streamer
 * through the parser's own URL cache (its _streamer on a miss) and the time, in C
 * (YYYY-MM-DDTHH:MM:SS[.f] with Z or an offset). It appends the record tuple, or counts the
 * rejection a fully valid line gets for its status, url-truncated or its streamer.
 *
 * Whatever else a line is (any other rejection, gaps, heartbeats, nesting, surrogate escapes,
 * integers beyond 18 digits, odd spellings of times, trailing blanks, ...) it is not decided
 * here: the call returns where that line is, the Python full path classifies it, and the next
 * call goes on after it. The Python path stays the reference; tests/test_decode_paths.py
 * compares the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define SPEEDUPS_VERSION 2

#define MAX_BYTES (1LL << 53)

/* What a field's last value was. */
enum { K_NONE = 0, K_STR, K_INT, K_OTHER };

/* What a string held besides plain printable ASCII. */
#define S_ESC 1      /* a backslash escape */
#define S_NONASCII 2 /* bytes >= 0x80 */
#define S_INVALID 4  /* invalid UTF-8 (repair mode only: else the line is not decided here) */

enum { F_SEQ, F_URL, F_CLIENT, F_UA, F_TIME, F_STATUS, F_SENT, F_TRUNCATED, F_COUNT };

typedef struct {
    const unsigned char *s; /* a string's contents (between the quotes) */
    Py_ssize_t n;
    int kind;
    int flags;
    long long value; /* an integer's */
} Field;

static PyObject *str_status, *str_url_truncated, *one;

/* The length of the well-formed UTF-8 sequence at p (Unicode 15, table 3-7, as CPython's
 * decoder checks it), or 0 if none begins there. */
static inline int
utf8_length(const unsigned char *p, const unsigned char *e)
{
    unsigned char c = p[0];
    Py_ssize_t left = e - p;
    if (c >= 0xC2 && c <= 0xDF)
        return left >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        unsigned char lo = 0x80, hi = 0xBF;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
        return left >= 3 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80 ? 3 : 0;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        unsigned char lo = 0x80, hi = 0xBF;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        return left >= 4 && p[1] >= lo && p[1] <= hi && (p[2] & 0xC0) == 0x80
            && (p[3] & 0xC0) == 0x80 ? 4 : 0;
    }
    return 0;
}

static inline int
hex_digit(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* The code point of \uXXXX's four hex digits at p (p + 4 <= end), or -1. */
static inline long
hex4(const unsigned char *p)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        int d = hex_digit(p[i]);
        if (d < 0)
            return -1;
        v = v << 4 | d;
    }
    return v;
}

/* Bytes that end a run of plain string contents: '"', '\\', control characters, >= 0x80. */
static unsigned char stops[256];

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define WORDS 1
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL
/* The bytes of an 8-byte word (little-endian) that may end a plain run, as high bits (the
 * has-zero-byte and has-less-than tests): the lowest one set is always such a byte (a false
 * one can only come after a true one, by a borrow), so ctz finds the first of them. */
static inline uint64_t
stop_bits(uint64_t w)
{
    uint64_t q = w ^ (ONES * '"');
    uint64_t b = w ^ (ONES * '\\');
    return (((q - ONES) & ~q) | ((b - ONES) & ~b) | (w - ONES * 0x20) | w) & HIGHS;
}
#endif

/* Scan a JSON string's contents from p (after its opening quote): the address of its closing
 * quote, what it held in *flags; NULL if the line is not decided here (no closing quote, a
 * control character, a bad or surrogate escape, invalid UTF-8 unless repairing). */
static const unsigned char *
scan_string(const unsigned char *p, const unsigned char *e, int repair, int *flags)
{
    int f = 0;
    for (;;) {
#if defined(__SSE2__) && defined(WORDS)
        /* 16 bytes at a time: '"', '\\', and (as signed bytes) < 0x20, which takes in >= 0x80 */
        const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\');
        const __m128i space = _mm_set1_epi8(0x20);
        while (e - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote),
                                                    _mm_cmpeq_epi8(v, backslash)),
                                       _mm_cmplt_epi8(v, space));
            int m = _mm_movemask_epi8(hit);
            if (m) {
                p += __builtin_ctz(m);
                goto stop;
            }
            p += 16;
        }
#endif
#ifdef WORDS
        while (e - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            uint64_t m = stop_bits(w);
            if (m) {
                p += __builtin_ctzll(m) >> 3;
                goto stop;
            }
            p += 8;
        }
#endif
        while (p < e && !stops[*p])
            p++;
        if (p >= e)
            return NULL;
#ifdef WORDS
    stop:;
#endif
        unsigned char c = *p;
        if (c == '"') {
            *flags = f;
            return p;
        }
        if (c == '\\') {
            f |= S_ESC;
            if (e - p < 2)
                return NULL;
            switch (p[1]) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p += 2;
                break;
            case 'u': {
                if (e - p < 6)
                    return NULL;
                long cp = hex4(p + 2);
                if (cp < 0 || (cp >= 0xD800 && cp <= 0xDFFF))
                    return NULL; /* invalid, or surrogates: pairs and lone ones are json's */
                p += 6;
                break;
            }
            default:
                return NULL;
            }
            continue;
        }
        if (c < 0x20)
            return NULL;
        f |= S_NONASCII;
        int n = utf8_length(p, e);
        if (n) {
            p += n;
        }
        else {
            if (!repair)
                return NULL;
            f |= S_INVALID;
            p++;
        }
    }
}

/* The str of a scanned string's contents, as json and the UTF-8 decoder (strict, or with the
 * "sfive-per-byte" handler) make it. */
static PyObject *
make_str(const unsigned char *s, Py_ssize_t n, int flags)
{
    if (flags == 0) {
        PyObject *u = PyUnicode_New(n, 127);
        if (u != NULL)
            memcpy(PyUnicode_DATA(u), s, n);
        return u;
    }
    if (!(flags & (S_ESC | S_INVALID)))
        return PyUnicode_DecodeUTF8((const char *)s, n, NULL);
    Py_UCS4 small[256];
    Py_UCS4 *buf = n <= 256 ? small : PyMem_Malloc(n * sizeof(Py_UCS4));
    if (buf == NULL)
        return PyErr_NoMemory();
    buf[0] = 0; /* flags: n > 0; only for gcc, which sees an uninitialised read */
    Py_ssize_t k = 0, i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == '\\') {
            unsigned char x = s[i + 1];
            i += 2;
            switch (x) {
            case 'b': buf[k++] = '\b'; break;
            case 'f': buf[k++] = '\f'; break;
            case 'n': buf[k++] = '\n'; break;
            case 'r': buf[k++] = '\r'; break;
            case 't': buf[k++] = '\t'; break;
            case 'u': buf[k++] = (Py_UCS4)hex4(s + i); i += 4; break;
            default: buf[k++] = x; break; /* " \ / */
            }
        }
        else if (c < 0x80) {
            buf[k++] = c;
            i++;
        }
        else {
            int len = utf8_length(s + i, s + n);
            if (len == 0) {
                buf[k++] = 0xFFFD;
                i++;
                continue;
            }
            Py_UCS4 cp;
            if (len == 2)
                cp = (c & 0x1F) << 6 | (s[i + 1] & 0x3F);
            else if (len == 3)
                cp = (c & 0x0F) << 12 | (s[i + 1] & 0x3F) << 6 | (s[i + 2] & 0x3F);
            else
                cp = (c & 0x07) << 18 | (s[i + 1] & 0x3F) << 12 | (s[i + 2] & 0x3F) << 6
                    | (s[i + 3] & 0x3F);
            buf[k++] = cp;
            i += len;
        }
    }
    PyObject *u = PyUnicode_FromKindAndData(PyUnicode_4BYTE_KIND, buf, k);
    if (buf != small)
        PyMem_Free(buf);
    return u;
}

/* Scan a JSON number from p: where it ends; its kind (K_INT with its value, K_OTHER for a
 * float); NULL for what json refuses or an integer of more than 18 digits. */
static const unsigned char *
scan_number(const unsigned char *p, const unsigned char *e, int *kind, long long *value)
{
    int negative = 0, digits = 0, is_float = 0;
    long long v = 0;
    if (*p == '-') {
        negative = 1;
        if (++p >= e)
            return NULL;
    }
    if (*p == '0') {
        p++;
        digits = 1;
    }
    else if (*p >= '1' && *p <= '9') {
        while (p < e && *p >= '0' && *p <= '9') {
            if (digits < 18)
                v = v * 10 + (*p - '0');
            digits++;
            p++;
        }
    }
    else {
        return NULL;
    }
    if (e - p >= 2 && *p == '.' && p[1] >= '0' && p[1] <= '9') {
        p += 2;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
        is_float = 1;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        const unsigned char *q = p + 1;
        if (q < e && (*q == '+' || *q == '-'))
            q++;
        if (q < e && *q >= '0' && *q <= '9') {
            while (q < e && *q >= '0' && *q <= '9')
                q++;
            p = q;
            is_float = 1;
        }
    }
    if (is_float) {
        *kind = K_OTHER;
        return p;
    }
    if (digits > 18)
        return NULL;
    *kind = K_INT;
    *value = negative ? -v : v;
    return p;
}

/* JSON's blanks (the exporter writes none: one test for the next byte). */
#define SKIP_WS(p, e) \
    do { \
        if ((p) < (e) && *(p) <= ' ') \
            while ((p) < (e) && (*(p) == ' ' || *(p) == '\t' || *(p) == '\n' \
                                 || *(p) == '\r')) \
                (p)++; \
    } while (0)

static const Py_ssize_t key_length[F_COUNT] = {3, 3, 6, 2, 4, 6, 10, 13};

/* The field a key names if it is spelled plainly (its name, then its closing quote), -1 if
 * not (any other key, also one that spells a name with an escape). (The line ends in "}", so
 * a key that matches is followed by at least one more byte.) */
#define IS(name) (e - k > (Py_ssize_t)sizeof(name) && memcmp(k, name "\"", sizeof(name)) == 0)
static inline int
known_key(const unsigned char *k, const unsigned char *e)
{
    switch (*k) {
    case 's':
        return IS("seq") ? F_SEQ : IS("status") ? F_STATUS : -1;
    case 'u':
        return IS("ua") ? F_UA : IS("url") ? F_URL : IS("url-truncated") ? F_TRUNCATED : -1;
    case 'c':
        return IS("client") ? F_CLIENT : -1;
    case 't':
        return IS("time") ? F_TIME : -1;
    case 'b':
        return IS("bytes-sent") ? F_SENT : -1;
    }
    return -1;
}
#undef IS

/* Scan one line as a flat JSON object exactly as json's strict decoder reads it (the line is
 * the object, nothing before or after it), its fields' last values into fields; 0 if the line
 * is not decided here. */
static int
scan_line(const unsigned char *p, const unsigned char *e, int repair, Field *fields)
{
    memset(fields, 0, sizeof(Field) * F_COUNT);
    if (p >= e || *p != '{' || e[-1] != '}')
        return 0;
    p++;
    SKIP_WS(p, e);
    if (p < e && *p == '}')
        return p + 1 == e;
    for (;;) {
        int flags, kind, index = -1;
        long long value = 0;
        if (p >= e || *p != '"')
            return 0;
        const unsigned char *key = p + 1, *end;
        index = known_key(key, e);
        if (index >= 0) {
            p = key + key_length[index] + 1;
        }
        else {
            /* Not a field's name spelled plainly: another key, or one with an escape, which
             * could spell any name. */
            end = scan_string(key, e, repair, &flags);
            if (end == NULL || flags & S_ESC)
                return 0;
            p = end + 1;
        }
        SKIP_WS(p, e);
        if (p >= e || *p != ':')
            return 0;
        p++;
        SKIP_WS(p, e);
        if (p >= e)
            return 0;
        unsigned char c = *p;
        const unsigned char *s = p + 1;
        if (c == '"') {
            end = scan_string(s, e, repair, &flags);
            if (end == NULL)
                return 0;
            kind = K_STR;
            p = end + 1;
        }
        else if (c == '-' || (c >= '0' && c <= '9')) {
            p = scan_number(p, e, &kind, &value);
            if (p == NULL)
                return 0;
        }
        else if (c == 't' && e - p >= 4 && memcmp(p, "true", 4) == 0) {
            kind = K_OTHER;
            p += 4;
        }
        else if (c == 'f' && e - p >= 5 && memcmp(p, "false", 5) == 0) {
            kind = K_OTHER;
            p += 5;
        }
        else if (c == 'n' && e - p >= 4 && memcmp(p, "null", 4) == 0) {
            kind = K_OTHER;
            p += 4;
        }
        else {
            return 0; /* nesting, NaN, Infinity, or not JSON */
        }
        if (index >= 0) {
            Field *f = &fields[index];
            f->kind = kind;
            if (kind == K_STR) {
                f->s = s;
                f->n = end - s;
                f->flags = flags;
            }
            else {
                f->value = value;
            }
        }
        SKIP_WS(p, e);
        if (p >= e)
            return 0;
        if (*p == ',') {
            p++;
            SKIP_WS(p, e);
            continue;
        }
        if (*p == '}')
            return p + 1 == e;
        return 0;
    }
}

static inline int
digits2(const unsigned char *p, int *v)
{
    if (p[0] < '0' || p[0] > '9' || p[1] < '0' || p[1] > '9')
        return 0;
    *v = (p[0] - '0') * 10 + (p[1] - '0');
    return 1;
}

/* Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static long long
days_from_civil(long long y, int m, int d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    long long yoe = y - era * 400;
    long long doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    long long doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* The last time's YYYY-MM-DDTHH:MM:SS and its second (lines come many to the second). */
typedef struct {
    unsigned char head[19];
    int valid;
    long long seconds;
} TimeMemo;

/* The UTC epoch second of YYYY-MM-DDTHH:MM:SS read as UTC, years 1-9999; 0 if none. */
static int
head_seconds(const unsigned char *s, long long *out)
{
    int y1, y2, month, day, hour, minute, second;
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':')
        return 0;
    if (!digits2(s, &y1) || !digits2(s + 2, &y2) || !digits2(s + 5, &month)
            || !digits2(s + 8, &day) || !digits2(s + 11, &hour) || !digits2(s + 14, &minute)
            || !digits2(s + 17, &second))
        return 0;
    int year = y1 * 100 + y2;
    if (year < 1 || month < 1 || month > 12 || hour > 23 || minute > 59 || second > 59
            || day < 1)
        return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > mdays[month - 1] + (month == 2 && leap))
        return 0;
    *out = days_from_civil(year, month, day) * 86400 + hour * 3600LL + minute * 60LL + second;
    return 1;
}

/* The UTC epoch second of YYYY-MM-DDTHH:MM:SS[(.|,)f{1,9}](Z|(+|-)HH[:]MM) in ASCII, years
 * 1-9999, as RecordParser.seconds gives it; 0 for anything else (which that decides). */
static int
parse_time(const unsigned char *s, Py_ssize_t n, long long *out, TimeMemo *memo)
{
    long long head;
    if (n < 20)
        return 0;
    if (memo->valid && memcmp(s, memo->head, 19) == 0) {
        head = memo->seconds;
    }
    else {
        if (!head_seconds(s, &head))
            return 0;
        memcpy(memo->head, s, 19);
        memo->seconds = head;
        memo->valid = 1;
    }
    const unsigned char *p = s + 19, *e = s + n;
    if (*p == '.' || *p == ',') {
        const unsigned char *q = ++p;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
        if (p - q < 1 || p - q > 9)
            return 0;
    }
    if (p >= e)
        return 0;
    long long offset = 0;
    if (*p == 'Z') {
        if (p + 1 != e)
            return 0;
    }
    else if (*p == '+' || *p == '-') {
        int sign = *p == '-' ? -1 : 1, oh, om;
        p++;
        if (e - p < 4 || !digits2(p, &oh))
            return 0;
        p += 2;
        if (*p == ':')
            p++;
        if (e - p != 2 || !digits2(p, &om) || oh > 23 || om > 59)
            return 0;
        offset = sign * (oh * 3600LL + om * 60LL);
    }
    else {
        return 0;
    }
    *out = head - offset;
    return 1;
}

/* Count one rejection as records._reject does (the reason's first line is ``at``). */
static int
reject(PyObject *rejected, PyObject *firsts, PyObject *reason, Py_ssize_t at)
{
    PyObject *count = PyDict_GetItemWithError(rejected, reason);
    if (count != NULL) {
        PyObject *more = PyNumber_Add(count, one);
        if (more == NULL)
            return -1;
        int r = PyDict_SetItem(rejected, reason, more);
        Py_DECREF(more);
        return r;
    }
    if (PyErr_Occurred())
        return -1;
    if (PyDict_SetItem(rejected, reason, one) < 0)
        return -1;
    PyObject *line = PyLong_FromSsize_t(at);
    if (line == NULL)
        return -1;
    int r = PyDict_SetItem(firsts, reason, line);
    Py_DECREF(line);
    return r;
}

typedef struct {
    PyObject *records, *rejected, *firsts, *urls, *streamer, *statuses;
    uint64_t status_bits[16]; /* statuses 0-1023, if all are ints (status_exact) */
    int status_exact;
    TimeMemo time;
    PyObject *t;              /* the last record's time, for the next one in that second */
} Context;

/* The statuses as bits, if all are ints (else every status is looked up in the set). */
static int
status_bits(Context *cx)
{
    memset(cx->status_bits, 0, sizeof(cx->status_bits));
    cx->status_exact = 1;
    PyObject *it = PyObject_GetIter(cx->statuses), *x;
    if (it == NULL)
        return -1;
    while ((x = PyIter_Next(it)) != NULL) {
        long v = PyLong_CheckExact(x) ? PyLong_AsLong(x) : -1;
        if (v == -1 && PyErr_Occurred())
            PyErr_Clear(); /* beyond a long: not in 0-1023 */
        if (!PyLong_CheckExact(x))
            cx->status_exact = 0;
        else if (v >= 0 && v < 1024)
            cx->status_bits[v >> 6] |= 1ULL << (v & 63);
        Py_DECREF(x);
    }
    Py_DECREF(it);
    return PyErr_Occurred() ? -1 : 0;
}

/* Whether status is one of the statuses; -1 on an error. */
static int
known_status(Context *cx, long long status)
{
    if (cx->status_exact && status >= 0 && status < 1024)
        return (cx->status_bits[status >> 6] >> (status & 63)) & 1;
    PyObject *value = PyLong_FromLongLong(status);
    if (value == NULL)
        return -1;
    int known = PySet_Contains(cx->statuses, value);
    Py_DECREF(value);
    return known;
}

/* Decide one scanned line: 1 if done (a record appended or a rejection counted; *seq_set and
 * *seq say whether and to what it moved the sequence number), 0 if the Python path decides
 * it, -1 on an error. */
static int
decide(Context *cx, Field *f, Py_ssize_t at, int *seq_set, long long *seq)
{
    Field *url = &f[F_URL], *client = &f[F_CLIENT], *ua = &f[F_UA], *when = &f[F_TIME];
    if (url->kind != K_STR || client->kind != K_STR || ua->kind != K_STR
            || when->kind != K_STR || f[F_STATUS].kind != K_INT || f[F_SENT].kind != K_INT)
        return 0; /* no url (a gap, heartbeat), missing-field, wrong-type */
    long long sent = f[F_SENT].value;
    if (sent < 0 || sent >= MAX_BYTES)
        return 0;
    /* From here the line is decided unless its time is odd (before anything is counted). */
    *seq_set = f[F_SEQ].kind == K_INT;
    *seq = f[F_SEQ].value;
    int known = known_status(cx, f[F_STATUS].value);
    if (known < 0)
        return -1;
    if (!known)
        return reject(cx->rejected, cx->firsts, str_status, at) < 0 ? -1 : 1;
    if (f[F_TRUNCATED].kind != K_NONE)
        return reject(cx->rejected, cx->firsts, str_url_truncated, at) < 0 ? -1 : 1;
    PyObject *key = make_str(url->s, url->n, url->flags);
    if (key == NULL)
        return -1;
    PyObject *streamer = PyDict_GetItemWithError(cx->urls, key);
    if (streamer != NULL) {
        Py_INCREF(streamer);
    }
    else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    else {
        streamer = PyObject_CallOneArg(cx->streamer, key);
        if (streamer == NULL) {
            Py_DECREF(key);
            return -1;
        }
    }
    Py_DECREF(key);
    if (PyUnicode_CheckExact(streamer)) {
        int r = reject(cx->rejected, cx->firsts, streamer, at);
        Py_DECREF(streamer);
        return r < 0 ? -1 : 1;
    }
    long long t;
    if (when->flags || !parse_time(when->s, when->n, &t, &cx->time)) {
        Py_DECREF(streamer);
        return 0;
    }
    PyObject *record = PyTuple_New(5);
    if (record == NULL) {
        Py_DECREF(streamer);
        return -1;
    }
    PyTuple_SET_ITEM(record, 1, streamer);
    PyObject *item;
    if (cx->t == NULL || PyLong_AsLongLong(cx->t) != t) {
        if ((item = PyLong_FromLongLong(t)) == NULL)
            goto fail;
        Py_XSETREF(cx->t, item);
    }
    Py_INCREF(cx->t);
    PyTuple_SET_ITEM(record, 0, cx->t);
    if ((item = make_str(client->s, client->n, client->flags)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(record, 2, item);
    if ((item = make_str(ua->s, ua->n, ua->flags)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(record, 3, item);
    if ((item = PyLong_FromLongLong(sent)) == NULL)
        goto fail;
    PyTuple_SET_ITEM(record, 4, item);
    int r = PyList_Append(cx->records, record);
    Py_DECREF(record);
    return r < 0 ? -1 : 1;
fail:
    Py_DECREF(record);
    return -1;
}

PyDoc_STRVAR(scan_doc,
"scan(items, split, i, pos, base, last_seq, repair, records, rejected, firsts, urls,\n"
"     streamer, statuses, starts) -> (i, pos, end, base, last_seq)\n\n"
"Classify the lines of ``items`` (bytes: blocks of lines joined by \"\\n\" if ``split``, one\n"
"line each if not) from item ``i``, byte ``pos`` on; ``base`` numbers the line (empty lines\n"
"in blocks do not count). Records go to ``records``, rejections into ``rejected`` and\n"
"``firsts`` (records._reject); ``urls``, ``streamer``, ``statuses``: the parser's URL cache,\n"
"its _streamer and its statuses. Stops at the first line it leaves to the Python path:\n"
"``items[i][pos:end]``, line number ``base``; ``i == len(items)`` when all are done.\n"
"``starts`` (a list, or None): the number of each item's first line is appended to it. With\n"
"``records`` None, only scans (the benchmark's decode stage).");

static PyObject *
scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 14 arguments");
        return NULL;
    }
    PyObject *items = args[0];
    Py_ssize_t i = PyLong_AsSsize_t(args[2]), pos = 0, base = 0;
    if (!PyErr_Occurred())
        pos = PyLong_AsSsize_t(args[3]);
    if (!PyErr_Occurred())
        base = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (i < 0 || pos < 0) { /* they index the list and the block */
        PyErr_SetString(PyExc_ValueError, "scan(): negative item or position");
        return NULL;
    }
    PyObject *last_seq = args[5];
    int split = PyObject_IsTrue(args[1]);
    int repair = split < 0 ? -1 : PyObject_IsTrue(args[6]);
    Context cx = {args[7], args[8], args[9], args[10], args[11], args[12]};
    PyObject *starts = args[13], *result = NULL;
    if (repair < 0)
        return NULL;
    if (!PyList_Check(items) || !PyDict_Check(cx.rejected) || !PyDict_Check(cx.firsts)
            || !PyDict_Check(cx.urls) || !PyAnySet_Check(cx.statuses)
            || (cx.records != Py_None && !PyList_Check(cx.records))
            || (starts != Py_None && !PyList_Check(starts))) {
        PyErr_SetString(PyExc_TypeError, "scan(): a list of items, dicts, a set of statuses");
        return NULL;
    }
    if (status_bits(&cx) < 0)
        return NULL;
    int only_scan = cx.records == Py_None;
    int seq_set = 0;
    long long seq = 0;
    Py_ssize_t end = 0;
    Field fields[F_COUNT];
    PyObject *held = NULL; /* the item being read: _streamer runs Python code meanwhile */
    for (; i < PyList_GET_SIZE(items); i++, pos = 0) {
        PyObject *item = PyList_GET_ITEM(items, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "scan(): the items must be bytes");
            goto done;
        }
        Py_INCREF(item);
        Py_XDECREF(held);
        held = item;
        if (pos == 0 && starts != Py_None) {
            PyObject *at = PyLong_FromSsize_t(base);
            if (at == NULL)
                goto done;
            int r = PyList_Append(starts, at);
            Py_DECREF(at);
            if (r < 0)
                goto done;
        }
        const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(item);
        Py_ssize_t size = PyBytes_GET_SIZE(item);
        while (pos <= size) {
            if (split) {
                const unsigned char *nl = memchr(data + pos, '\n', size - pos);
                end = nl != NULL ? nl - data : size;
                if (end == pos) { /* an empty line: not a line */
                    pos = end + 1;
                    continue;
                }
            }
            else {
                if (pos > 0)
                    break;
                end = size;
            }
            int decided = 0, line_seq_set = 0;
            long long line_seq = 0;
            if (scan_line(data + pos, data + end, repair, fields)) {
                if (only_scan)
                    decided = 1;
                else
                    decided = decide(&cx, fields, base, &line_seq_set, &line_seq);
            }
            if (decided < 0)
                goto done;
            if (!decided)
                goto stop;
            if (line_seq_set) {
                seq_set = 1;
                seq = line_seq;
            }
            base++;
            pos = end + 1;
        }
    }
    end = 0;
stop:
    if (seq_set)
        last_seq = PyLong_FromLongLong(seq);
    else
        Py_INCREF(last_seq);
    if (last_seq != NULL)
        result = Py_BuildValue("(nnnnN)", i, pos, end, base, last_seq);
done:
    Py_XDECREF(held);
    Py_XDECREF(cx.t);
    return result;
}

PyDoc_STRVAR(seconds_doc,
"seconds(when: bytes) -> int or None\n\n"
"The UTC epoch second scan() gives a record's time (the common ISO 8601 form); None where it\n"
"leaves the time to RecordParser.seconds.");

static PyObject *
seconds(PyObject *module, PyObject *arg)
{
    long long t;
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "seconds() takes bytes");
        return NULL;
    }
    TimeMemo memo = {{0}, 0, 0};
    if (!parse_time((const unsigned char *)PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg), &t,
                    &memo))
        Py_RETURN_NONE;
    return PyLong_FromLongLong(t);
}

static PyMethodDef speedups_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL, scan_doc},
    {"seconds", seconds, METH_O, seconds_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "_speedups",
    "C accelerator of sfive_ngxlua.records (optional: records.py works without it).", -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    str_status = PyUnicode_InternFromString("status");
    str_url_truncated = PyUnicode_InternFromString("url-truncated");
    one = PyLong_FromLong(1);
    if (str_status == NULL || str_url_truncated == NULL || one == NULL)
        return NULL;
    for (int c = 0; c < 256; c++)
        stops[c] = c == '"' || c == '\\' || c < 0x20 || c >= 0x80;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", SPEEDUPS_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
