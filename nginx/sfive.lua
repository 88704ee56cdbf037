-- sfive.lua: the nginx-lua exporter of sfive-ngxlua.
--
-- Log phase (M.log): every finished request becomes one JSON line
--   {"seq":N,"time":"...","client":"...","ua":"...","url":"...","status":200,"bytes-sent":1234}
-- Each worker buffers its lines (at most batch_size, at most flush_interval seconds: a timer,
-- which also runs when the worker exits) and then hands the whole batch to the ring, an
-- ngx.shared dict, with one incr by N (the sequence numbers: all workers share one ordered
-- stream) and one safe_set of the batch under "b<first seq>". So the dict's lock is taken per
-- batch, not per request. The ring is bounded in records (ring_size) and in bytes (ring_bytes,
-- counted by the exporter itself): the oldest batches are deleted to stay within both (by
-- whichever worker flushes, one at a time), never the newest, and never by the dict's own LRU
-- eviction (every new entry is stored with safe_set). "gc" marks the oldest batch still held.
-- User agents and URLs are cut to max_ua_bytes / max_url_bytes (on a UTF-8 boundary); a cut URL
-- is marked ("url-truncated": its length), so that the service rejects it instead of counting a
-- wrong stream.
--
-- Content phase (M.serve): streams the ring to a subscriber, from "now" or from ?after=N (also
-- in the middle of a batch), with its own cursor, so any number of subscribers each see every
-- line in order. A subscriber that fell behind the ring gets a gap line {"lost":K,"seq":S}
-- (records S-K .. S-1 are gone, S comes next). Memory stays bounded: old batches are deleted,
-- and a slow subscriber only holds one write (ngx.flush(true) waits for the socket without
-- blocking the worker).
--
-- Protocol 2 (GET /sfive?v=2[&after=N][&ring=ID]): every response carries X-Sfive-Protocol: 2
-- and X-Sfive-Ring: ID, the ring's identity (16 hex digits, made once per shared dict with
-- dict:add, so a reload keeps it and a restart makes a new one). ?ring=ID naming another ring
-- starts from the first record this ring holds. A v=2 subscriber also gets heartbeat lines
-- {"seq":S,"hb":T,"oldest":O,"oldest-time":OT} at least every heartbeat_interval: it has
-- everything up to S, and every record whose time is before T (epoch seconds) has been delivered
-- at or before S; O is the oldest record the ring still holds and OT about its time (both only
-- once the ring holds a record). When the worker exits (reload, quit), a stream first drains
-- what the other workers still log (drain_max at most); a subscriber that has not taken the
-- stream's end drain_max + DRAIN_GRACE into the exit is cut, so that the worker can go.
--
-- Works with lua-nginx-module >= 0.10.6 (Debian bookworm's libnginx-mod-http-lua 0.10.23) and
-- OpenResty. Needs no Lua library besides the module itself.

local ngx = ngx
local shared = ngx.shared
local byte, find, format, gsub, match, sub =
    string.byte, string.find, string.format, string.gsub, string.match, string.sub
local concat = table.concat
local ceil, floor, min = math.ceil, math.floor, math.min
local os_date = os.date
local pairs, tonumber, tostring, type = pairs, tonumber, tostring, type

local M = { _VERSION = "1.0" }

local SEQ_KEY = "seq"          -- the newest sequence number taken
local RING_KEY = "ring"        -- the ring's identity
local GC_KEY = "gc"            -- first seq of the oldest batch not yet deleted: the oldest held
local BYTES_KEY = "bytes"      -- what the stored batches take in the dict (the ring's own count)
local GC_LOCK = "gclock"       -- > 0 while a worker deletes old batches
local GC_TIME = "gctime"       -- when that worker began
local BATCH = "b"              -- a batch's key: "b" .. its first seq
local LAST = "e"               -- "e" .. a batch's first seq: its last seq (older exporters)
local META = "m"               -- "m" .. a batch's first seq: "<last seq> <bytes> <first time>"
local FORMAT_KEY = "format"    -- how the ring is laid out: FORMAT
local FORMAT = 2
local PROTOCOL = 2
local MAX_BATCH = 1000         -- batch_size at most: a reader looks this far for a batch's start
local PAGE = 4096              -- the slab allocator's page: larger entries take whole pages
local NODE = 80                -- an entry's bookkeeping in the dict besides its key and value
local CACHE_STRING_MAX = 1024  -- longer user agents and URLs are cut and escaped every time

-- How long after its time a record may become visible in the ring at most, beyond the
-- buffering (a worker's cached clock lags the real one by its event-loop iteration, a timer
-- fires late on a busy worker): heartbeats promise T = now - flush_interval - this.
local CLOCK_SLACK = 0.3

-- At a worker's exit a stream ends itself within drain_max, but only between two writes: a
-- write waits (ngx.flush(true)) for a subscriber that does not read (stopped, hung, or behind
-- with its socket buffers full) for send_timeout (60 s), and nginx then waits as long again to
-- send the response's end, and the worker with it (91 s measured). So a guard beside each
-- stream cuts the connection when the stream has not ended DRAIN_GRACE after drain_max; it
-- looks whether the worker is exiting every GUARD_POLL seconds.
local DRAIN_GRACE = 0.5
local GUARD_POLL = 0.25

local config = {
    dict = "sfive",          -- name of the lua_shared_dict holding the ring
    ring_size = 100000,      -- records held for subscribers that fall behind or reconnect
    ring_bytes = false,      -- bytes the ring's batches may take (false: 3/4 of the dict)
    max_ua_bytes = 2048,     -- user agents are cut to this (>= 4 x the service's --max-ua-length)
    max_url_bytes = 8192,    -- URLs are cut to this, and the cut is marked (url-truncated)
    cache_bytes = 1048576,   -- per worker: escaped user agents and URLs kept for reuse
    poll_interval = 0.05,    -- seconds a caught-up subscriber sleeps between polls
    batch_max = 1000,        -- most records sent with one ngx.print / ngx.flush
    pending_timeout = 1,     -- seconds to wait for a counted but unwritten slot before skipping it
    heartbeat_interval = 0.25,  -- seconds between heartbeat lines to a v=2 subscriber, at most
    drain_quiet = 0.2,       -- at a worker's exit, a stream ends once no record came for this long
    drain_max = 2,           -- ... or after this long at most
    batch_size = 256,        -- most records a worker buffers before it hands them to the ring
    flush_interval = 0.05,   -- most seconds a record waits in its worker's buffer
}

local function check(cond, msg)
    if not cond then
        error("sfive: " .. msg, 3)
    end
end

local function is_int(v, min)
    return type(v) == "number" and v == floor(v) and v >= min and v < 2 ^ 53
end

--- Set knobs (call from init_by_lua*); unknown names and bad values are errors.
function M.configure(opts)
    check(opts == nil or type(opts) == "table", "configure() takes a table of options")
    for k, v in pairs(opts or {}) do
        check(config[k] ~= nil, "unknown option '" .. tostring(k) .. "'")
        config[k] = v
    end
    check(type(config.dict) == "string" and config.dict ~= "", "dict must be a dict name")
    check(is_int(config.ring_size, 1), "ring_size must be an integer >= 1")
    check(type(config.poll_interval) == "number" and config.poll_interval >= 0.001,
          "poll_interval must be a number of seconds >= 0.001")
    check(is_int(config.batch_max, 1), "batch_max must be an integer >= 1")
    check(type(config.pending_timeout) == "number" and config.pending_timeout > 0,
          "pending_timeout must be a number of seconds > 0")
    check(type(config.heartbeat_interval) == "number" and config.heartbeat_interval >= 0.01,
          "heartbeat_interval must be a number of seconds >= 0.01")
    check(type(config.drain_quiet) == "number" and config.drain_quiet >= 0,
          "drain_quiet must be a number of seconds >= 0")
    check(type(config.drain_max) == "number" and config.drain_max >= 0,
          "drain_max must be a number of seconds >= 0")
    check(is_int(config.batch_size, 1) and config.batch_size <= MAX_BATCH,
          "batch_size must be an integer from 1 to " .. MAX_BATCH)
    check(type(config.flush_interval) == "number" and config.flush_interval > 0
          and config.flush_interval <= 1, "flush_interval must be a number of seconds in (0, 1]")
    check(is_int(config.max_ua_bytes, 16), "max_ua_bytes must be an integer >= 16")
    check(is_int(config.max_url_bytes, 16), "max_url_bytes must be an integer >= 16")
    check(is_int(config.cache_bytes, 0), "cache_bytes must be an integer >= 0")
    local dict = shared[config.dict]
    check(dict ~= nil, "lua_shared_dict '" .. config.dict
          .. "' is not declared; add 'lua_shared_dict " .. config.dict .. " 64m;' to http {}")
    local capacity = dict.capacity and dict:capacity()
    if config.ring_bytes == false then
        check(capacity ~= nil, "ring_bytes must be set (this nginx-lua has no dict:capacity())")
        config.ring_bytes = floor(capacity * 3 / 4)
    end
    check(is_int(config.ring_bytes, PAGE), "ring_bytes must be an integer >= " .. PAGE)
    check(capacity == nil or config.ring_bytes <= capacity, "ring_bytes must be at most the "
          .. "size of lua_shared_dict '" .. config.dict .. "' (" .. tostring(capacity) .. ")")
    M.ring_id(dict)
    return M
end

local function random_hex(bytes)
    local f = io.open("/dev/urandom", "rb")
    local raw = f and f:read(bytes)
    if f then
        f:close()
    end
    if not raw or #raw ~= bytes then
        math.randomseed(floor(ngx.now() * 1000) + (ngx.worker and ngx.worker.pid() or 0))
        local t = {}
        for i = 1, bytes do
            t[i] = string.char(math.random(0, 255))
        end
        raw = concat(t)
    end
    return (gsub(raw, ".", function(c) return format("%02x", byte(c)) end))
end

--- The ring's identity, made once per shared dict (dict:add: a reload keeps it, a restart of
--- nginx makes a new dict and so a new identity). Also makes sure the counters exist, so that
--- no key but batches is ever created later, when a full dict could only make room by evicting
--- (batches are stored with safe_set, which never evicts).
function M.ring_id(dict)
    dict = dict or shared[config.dict]
    local id = dict:get(RING_KEY)
    if id and dict:get(FORMAT_KEY) == FORMAT then
        dict:safe_add(BYTES_KEY, 0)  -- a reload from an exporter without it: its batches uncounted
        return id
    end
    if ngx.get_phase() == "init" and (id or dict:get(SEQ_KEY)) then
        -- a reload from an exporter that laid the ring out otherwise (one slot per record):
        -- start a new ring (a new identity tells the service) rather than keep slots nobody
        -- would ever delete
        dict:flush_all()
        dict:flush_expired()
    end
    dict:add(FORMAT_KEY, FORMAT)
    dict:add(SEQ_KEY, 0)
    dict:add(GC_KEY, 1)
    dict:add(BYTES_KEY, 0)
    dict:add(GC_LOCK, 0)
    dict:add(GC_TIME, 0)
    dict:add(RING_KEY, random_hex(8))  -- fails harmlessly if another worker was first
    return dict:get(RING_KEY)
end

--- The current knobs (a copy).
function M.settings()
    local copy = {}
    for k, v in pairs(config) do
        copy[k] = v
    end
    return copy
end

-- Time: ISO 8601, local time with offset, millisecond precision, as the line's pieces. The
-- date and the offset are formatted once per second, the milliseconds come from a table.
local last_sec, date_dot, offset_client
local MS = {}
for i = 0, 999 do
    MS[i] = format("%03d", i)
end

local function set_second(sec)
    date_dot = os_date("%Y-%m-%dT%H:%M:%S", sec) .. "."
    local z = os_date("%z", sec)
    offset_client = sub(z, 1, 3) .. ":" .. sub(z, 4, 5) .. '","client":"'
    last_sec = sec
end

-- JSON strings. Headers and URIs are arbitrary bytes: invalid UTF-8 becomes U+FFFD so that
-- every line is valid JSON text; control characters, '"' and '\' are escaped.
local ESCAPES = {
    ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t',
    ['\b'] = '\\b', ['\f'] = '\\f',
}

local function escape_char(c)
    return ESCAPES[c] or format("\\u%04x", byte(c))
end

local function utf8_len(s, i, len)
    local c = byte(s, i)
    local n
    if c >= 0xC2 and c <= 0xDF then
        n = 2
    elseif c >= 0xE0 and c <= 0xEF then
        n = 3
    elseif c >= 0xF0 and c <= 0xF4 then
        n = 4
    else
        return nil
    end
    if i + n - 1 > len then
        return nil
    end
    for k = 1, n - 1 do
        local cc = byte(s, i + k)
        if cc < 0x80 or cc > 0xBF then
            return nil
        end
    end
    local c2 = byte(s, i + 1)
    if (c == 0xE0 and c2 < 0xA0) or (c == 0xED and c2 > 0x9F)
            or (c == 0xF0 and c2 < 0x90) or (c == 0xF4 and c2 > 0x8F) then
        return nil  -- overlong form, surrogate, or beyond U+10FFFF
    end
    return n
end

local function utf8_clean(s)
    local parts, np, i, len, run = {}, 0, 1, #s, 1
    while i <= len do
        if byte(s, i) < 0x80 then
            i = i + 1
        else
            local n = utf8_len(s, i, len)
            if n then
                i = i + n
            else
                parts[np + 1] = sub(s, run, i - 1)
                parts[np + 2] = "\239\191\189"
                np = np + 2
                i = i + 1
                run = i
            end
        end
    end
    if np == 0 then
        return s
    end
    parts[np + 1] = sub(s, run)
    return concat(parts)
end

-- The text of a JSON string without its quotes (most strings come back as they are).
local re_find = ngx.re and ngx.re.find
local SPECIAL = [=[[\x00-\x1f"\\\x80-\xff]]=]

-- Whether s has a byte to escape or to check as UTF-8: PCRE (compiled once, JIT where nginx
-- has it) is much cheaper than a Lua pattern, which LuaJIT cannot compile.
local function special(s)
    if re_find then
        local from, err = re_find(s, SPECIAL, "jo")
        if from or not err then
            return from
        end
    end
    return find(s, '[%z\1-\31"\\\128-\255]')
end

local function json_text(s)
    if s == nil then
        return ""
    end
    if special(s) then
        if find(s, "[\128-\255]") then
            s = utf8_clean(s)
        end
        s = gsub(s, '[%z\1-\31"\\]', escape_char)
    end
    return s
end

local function json_string(s)
    return '"' .. json_text(s) .. '"'
end

M.json_string = json_string

local warned = {}

local function warn_once(key, ...)
    if not warned[key] then
        warned[key] = true
        ngx.log(ngx.WARN, "sfive: ", ...)
    end
end

-- The last seq of a batch: the last line's ('{"seq":' starts lines only, strings are escaped),
-- looked for from the end (a pattern over the whole batch would cost more than the rest).
local function batch_last(batch)
    local len, window = #batch, 512
    while true do
        local from = len > window and len - window or 1
        local at, p = nil, from
        while true do
            p = find(batch, '\n{"seq":', p, true)
            if not p then
                break
            end
            at, p = p, p + 1
        end
        if at then
            return tonumber(match(batch, "^%d+", at + 8))
        end
        if from == 1 then
            return tonumber(match(batch, '^{"seq":(%d+)'))
        end
        window = window * 4
    end
end

-- What an entry takes in the dict (key, value and bookkeeping, as the slab allocator rounds it:
-- whole pages above half a page, else a power of two), for the ring's own byte count.
local function entry_bytes(key_len, value_len)
    local n = NODE + key_len + value_len
    if n > PAGE / 2 then
        return ceil(n / PAGE) * PAGE
    end
    local size = 16
    while size < n do
        size = size * 2
    end
    return size
end

-- A batch's meta entry: its last seq, the bytes it was counted with, its first record's time.
local function read_meta(dict, first)
    local meta = dict:get(META .. first)
    if meta then
        local last, bytes, t = match(meta, "^(%d+) (%d+) (%S+)$")
        return tonumber(last), tonumber(bytes), tonumber(t)
    end
    local last = dict:get(LAST .. first)  -- a batch of an older exporter (a reload): uncounted
    if last == nil then
        local batch = dict:get(BATCH .. first)  -- stored, its meta not (yet)
        last = batch and (batch_last(batch) or first)
    end
    return last
end

local function delete_batch(dict, first, bytes)
    dict:delete(BATCH .. first)
    dict:delete(META .. first)
    dict:delete(LAST .. first)
    if bytes then
        dict:incr(BYTES_KEY, -bytes)
    end
end

-- Deleting the oldest batches: one worker at a time (GC_LOCK, an incr on a key that always
-- exists, so that a full dict never stops it), a few batches per flush, in sequence order, so
-- that GC_KEY always marks the oldest batch held (a reader that finds a batch gone and its seq
-- below GC_KEY knows at once that it was deleted). Batches go while their records are more than
-- ring_size records old, or while the ring takes more than ring_bytes, or (force: the dict had
-- no room for a new entry) at least one. Slots from `mine` on (the caller's own batch and newer)
-- are never touched. gc_due is this worker's idea of when the oldest batch falls out by records.
-- Returns whether it deleted anything (nil: another worker holds the lock).
local gc_due = 0
local gc_missing, gc_missing_since

local function collect(dict, mine, newest, force)
    local limit = newest - config.ring_size   -- batches ending at or before it are out
    if dict:incr(GC_LOCK, 1, 0) ~= 1 then
        dict:incr(GC_LOCK, -1)
        if ngx.now() - (dict:get(GC_TIME) or 0) > 10 then
            dict:safe_set(GC_LOCK, 0)  -- its holder died in the middle (a crashed worker)
        end
        return nil
    end
    dict:safe_set(GC_TIME, ngx.now())
    local first = dict:get(GC_KEY) or 1
    local freed = false
    for _ = 1, force and 64 or 16 do
        if first >= mine then
            break
        end
        local over = (dict:get(BYTES_KEY) or 0) > config.ring_bytes or (force and not freed)
        if first > limit and not over then
            gc_due = first
            break
        end
        local last, bytes = read_meta(dict, first)
        if last then
            if last > limit and not over then
                gc_due = last
                break
            end
            -- the marker first: whoever then misses the batch sees that it is gone
            dict:safe_set(GC_KEY, last + 1)
            delete_batch(dict, first, bytes)
            first, freed = last + 1, true
        else
            -- never stored (a worker that died between incr and safe_set) or not yet: after
            -- pending_timeout (at once if the dict is full) go on at the next batch stored
            local now = ngx.now()
            if gc_missing ~= first then
                gc_missing, gc_missing_since = first, now
            end
            if now - gc_missing_since < config.pending_timeout and not force then
                break
            end
            local s, stop = first + 1, min(first + MAX_BATCH, mine)
            while s < stop and dict:get(META .. s) == nil and dict:get(LAST .. s) == nil do
                s = s + 1
            end
            first = s
            dict:safe_set(GC_KEY, first)
        end
    end
    dict:incr(GC_LOCK, -1)
    return freed
end

local function warn_lost(first, last, why)
    warn_once("noroom", "lua_shared_dict '", config.dict, "' has no room for a batch of records (",
              why, "): records ", first, "-", last, " are lost; make the dict larger")
end

-- safe_set, making room by deleting the oldest batches when the dict is full (fragmented, or
-- holding entries the byte count does not know of); false, err if it still does not fit.
-- The third result is true when it gave up because another worker held the deletion lock
-- all along (it may have been descheduled): worth trying again a moment later.
local function store(dict, key, value, mine, newest)
    local ok, err = dict:safe_set(key, value)
    local tries, waits, freed = 0, 0, true
    while not ok and err == "no memory" and tries < 32 and waits < 200 do
        freed = collect(dict, mine, newest, true)
        if freed == false then
            break  -- nothing older left to delete: a batch larger than what the dict can hold
        elseif freed == nil then
            waits = waits + 1  -- another worker is deleting: try again
        else
            tries = tries + 1
        end
        ok, err = dict:safe_set(key, value)
    end
    return ok, err, not ok and freed == nil
end

-- A batch and then its meta entry (the meta entry says the batch is complete).
local function put_batch(dict, first, last, key, batch, meta)
    local ok, err, busy = store(dict, key, batch, first, last)
    if ok then
        ok, err, busy = store(dict, META .. first, meta, first, last)
        if not ok then
            dict:delete(key)
        end
    end
    return ok, err, busy
end

local function put_done(dict, ok, err, first, last, bytes, size)
    if not ok then
        dict:incr(BYTES_KEY, -bytes)
        if err == "no memory" then
            warn_lost(first, last, size .. " bytes")
        else
            ngx.log(ngx.ERR, "sfive: cannot store records ", first, "-", last, ": ", err)
        end
    elseif first < (dict:get(GC_KEY) or 1) then
        -- given up as never stored while it took this worker so long (pending_timeout): the
        -- subscribers were told it is lost, and nobody would delete it
        delete_batch(dict, first, bytes)
    end
end

-- The dict was full and another worker kept the deletion lock: try again for a while from a
-- timer, which may sleep (the log phase may not), well within pending_timeout.
local function put_later(_, first, last, key, batch, meta, bytes)
    local dict = shared[config.dict]
    local ok, err, busy
    for _ = 1, 100 do
        ngx.sleep(0.002)
        ok, err, busy = put_batch(dict, first, last, key, batch, meta)
        if ok or not busy then
            break
        end
    end
    put_done(dict, ok, err, first, last, bytes, #batch)
end

-- The JSON text of user agents and URLs seen lately (at most cache_bytes, then it starts again),
-- cut to their caps; a URL's text includes its closing quote and, if cut, the url-truncated
-- field (the batch layout has no separate slot for it).
local cached_ua, cached_url, cache_used = {}, {}, 0

-- s cut to at most n bytes, never inside a UTF-8 sequence (the one the cut would split goes)
local function cut(s, n)
    for q = n, n > 3 and n - 2 or 1, -1 do
        local c = byte(s, q)
        if c < 0x80 then
            break
        end
        if c >= 0xC2 then
            local len = utf8_len(s, q, #s)
            if len and q + len - 1 > n then
                return sub(s, 1, q - 1)
            end
            break
        end
    end
    return sub(s, 1, n)
end

M.cut = cut

local function remember(urls, s, text)
    if #s <= CACHE_STRING_MAX then
        local size = #s + #text + 64
        if cache_used + size > config.cache_bytes then
            cached_ua, cached_url, cache_used = {}, {}, 0
        end
        if size <= config.cache_bytes then
            (urls and cached_url or cached_ua)[s] = text
            cache_used = cache_used + size
        end
    end
    return text
end

local function ua_text(s)
    local max = config.max_ua_bytes
    return remember(false, s, json_text(#s > max and cut(s, max) or s))
end

local function url_text(s)
    local max = config.max_url_bytes
    if #s > max then
        return remember(true, s, json_text(cut(s, max)) .. '","url-truncated":' .. #s)
    end
    return remember(true, s, json_text(s) .. '"')
end

-- This worker's buffer: SLOTS pieces per record, laid out so that one table.concat makes the
-- batch's lines. The constant pieces are written once, when a slot is first used; the log phase
-- fills in the variable ones, the flush the sequence numbers.
local SLOTS = 16
local buf, nbuf, nready = {}, 0, 0
local buf_since            -- when the oldest buffered record was logged
local timer_pending = false
local timer_at = ngx.timer.at
local ngx_now = ngx.now

local function flush()
    local n = nbuf
    if n == 0 then
        return
    end
    nbuf = 0
    local dict = shared[config.dict]
    if not dict then
        return warn_once("nodict", "lua_shared_dict '", config.dict,
                         "' is not declared; requests are not exported")
    end
    local last, err = dict:incr(SEQ_KEY, n, 0)
    if not last then
        return ngx.log(ngx.ERR, "sfive: cannot number ", n, " records: ", err)
    end
    local first = last - n + 1
    local k = 2
    for seq = first, last do
        buf[k] = seq
        k = k + SLOTS
    end
    local key = BATCH .. first
    local batch = concat(buf, "", 1, n * SLOTS)
    local bytes = entry_bytes(#key, #batch) + entry_bytes(#META + #key - #BATCH, 40)
    local meta = format("%d %d %.3f", last, bytes, buf_since)
    -- make room first (the oldest batches go), then store: safe_set never evicts, so the ring's
    -- identity, its counters and its order stay whatever the dict's size
    local used = dict:incr(BYTES_KEY, bytes)
    if (used or 0) > config.ring_bytes or last - config.ring_size >= gc_due then
        collect(dict, first, last, false)
    end
    local ok, busy
    ok, err, busy = put_batch(dict, first, last, key, batch, meta)
    if not (busy and ngx.timer.at(0, put_later, first, last, key, batch, meta, bytes)) then
        put_done(dict, ok, err, first, last, bytes, #batch)
    end
    local late = ngx_now() - buf_since - config.flush_interval
    if late > CLOCK_SLACK then
        warn_once("late", "records reached the ring ", format("%.3f", late), " s later than ",
                  "flush_interval (a worker too busy for its timers): heartbeats may have ",
                  "promised their time too early")
    end
end

local function on_timer()
    -- also when the worker exits (premature): what it buffered goes to the ring then
    timer_pending = false
    flush()
end

--- Log phase: buffer the finished request. Never yields, never blocks.
function M.log()
    local n = nbuf
    local base = n * SLOTS
    if n >= nready then
        buf[base + 1], buf[base + 3] = '{"seq":', ',"time":"'
        buf[base + 8], buf[base + 10] = '","ua":"', '","url":"'
        buf[base + 12], buf[base + 14], buf[base + 16] = ',"status":', ',"bytes-sent":', '}\n'
        nready = n + 1
    end
    local now = ngx_now()
    local sec = floor(now)
    if sec ~= last_sec then
        set_second(sec)
    end
    local ms = floor((now - sec) * 1000 + 0.5)
    local var = ngx.var
    buf[base + 4] = date_dot
    buf[base + 5] = MS[ms] or "999"
    buf[base + 6] = offset_client
    buf[base + 7] = var.remote_addr or ""  -- nginx's own text of an address: nothing to escape
    -- user agents and URLs come back again and again (players, segments fetched by every
    -- viewer): each is cut and checked for escaping once, then found in a small cache
    local ua, uri = var.http_user_agent or "", var.uri or ""
    buf[base + 9] = cached_ua[ua] or ua_text(ua)
    buf[base + 11] = cached_url[uri] or url_text(uri)
    local status = var.status
    if status == nil or byte(status, 1) == 48 then
        status = "0"  -- "000": no status was set
    end
    buf[base + 13] = status
    buf[base + 15] = var.bytes_sent or "0"
    nbuf = n + 1
    if n == 0 then
        buf_since = now
    end
    if n + 1 >= config.batch_size then
        flush()
    elseif not timer_pending then
        if timer_at(config.flush_interval, on_timer) then
            timer_pending = true
        else
            flush()  -- no timers any more (the worker is exiting): store it at once
        end
    end
end

local function gap_line(lost, next_seq)
    return format('{"lost":%d,"seq":%d}\n', lost, next_seq)
end

-- Epoch seconds of a record's "time" (local time with its UTC offset, milliseconds): the first
-- one at or after position pos of a batch.
local function days_from_civil(y, m, d)
    y = m <= 2 and y - 1 or y
    local era = floor(y / 400)
    local yoe = y - era * 400
    local doy = floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5) + d - 1
    local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
    return era * 146097 + doe - 719468
end

local function line_time(text, pos)
    local y, mo, d, h, mi, sec, ms, sign, oh, om = match(text,
        '"time":"(%d+)%-(%d+)%-(%d+)T(%d+):(%d+):(%d+)%.(%d+)([+-])(%d+):(%d+)"', pos)
    if not y then
        return nil
    end
    local offset = (tonumber(oh) * 3600 + tonumber(om) * 60) * (sign == "-" and -1 or 1)
    return days_from_civil(tonumber(y), tonumber(mo), tonumber(d)) * 86400
        + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(sec) + tonumber(ms) / 1000 - offset
end

M.line_time = line_time

-- Where record seq's line starts in a batch (nil: not in it).
local function line_at(batch, seq)
    return find(batch, '{"seq":' .. seq .. ',', 1, true)
end

-- The stored batch holding record seq (it may start before seq): the batch and its first seq.
local function find_batch(dict, seq)
    for first = seq, seq > MAX_BATCH and seq - MAX_BATCH + 1 or 1, -1 do
        local batch = dict:get(BATCH .. first)
        if batch then
            if (batch_last(batch) or 0) >= seq then
                return batch, first
            end
            return nil
        end
    end
end

-- The first stored batch after seq, up to MAX_BATCH on and at most newest: batch, first.
local function next_batch(dict, seq, newest)
    for first = seq + 1, min(seq + MAX_BATCH, newest) do
        local batch = dict:get(BATCH .. first)
        if batch then
            return batch, first
        end
    end
end

-- The oldest record the ring still holds (for newest): the oldest batch not deleted (GC_KEY,
-- kept by collect), and never older than ring_size records.
local function oldest_held(dict, newest, ring)
    local gc = dict:get(GC_KEY) or 1
    local by_records = newest - ring + 1
    return gc > by_records and gc or by_records
end

-- The heartbeat's fields of the ring's history: the oldest record held and about its time (its
-- batch's first record), or "" while the ring holds none.
local function history(dict, newest, ring)
    local oldest = oldest_held(dict, newest, ring)
    if oldest > newest then
        return ""
    end
    local gc = dict:get(GC_KEY) or 1
    local _, _, t = read_meta(dict, gc)
    if t == nil then
        return format(',"oldest":%d', oldest)
    end
    return format(',"oldest":%d,"oldest-time":%.3f', oldest, t)
end

local function on_abort()
    ngx.exit(499)
end

local function bad_request(msg)
    ngx.status = ngx.HTTP_BAD_REQUEST
    ngx.header.content_type = "text/plain"
    ngx.say("sfive: ", msg)
    return ngx.exit(ngx.HTTP_BAD_REQUEST)
end

--- Content phase: stream records to this subscriber until it disconnects or the worker exits
--- (nginx reload); a subscriber reconnects with ?after=<last seq it got> to lose nothing.
function M.serve()
    local dict = shared[config.dict]
    if not dict then
        ngx.log(ngx.ERR, "sfive: lua_shared_dict '", config.dict, "' is not declared")
        return ngx.exit(ngx.HTTP_INTERNAL_SERVER_ERROR)
    end
    local method = ngx.req.get_method()
    if method ~= "GET" and method ~= "HEAD" then
        ngx.header["Allow"] = "GET, HEAD"
        return ngx.exit(ngx.HTTP_NOT_ALLOWED)
    end

    local var = ngx.var
    local after, v, want_ring = var.arg_after, var.arg_v, var.arg_ring
    if after ~= nil and (not match(after, "^%d+$") or #after > 15) then
        return bad_request("'after' must be a sequence number (a non-negative integer)")
    end
    if v ~= nil and (not match(v, "^%d+$") or #v > 5) then
        return bad_request("'v' must be a protocol version (a positive integer)")
    end
    if want_ring ~= nil and not match(want_ring, "^%x+$") then
        return bad_request("'ring' must be a ring identity (hex digits, as X-Sfive-Ring)")
    end
    local v2 = v ~= nil and tonumber(v) >= PROTOCOL

    local ring = config.ring_size
    local batch_max = config.batch_max
    local ring_id = M.ring_id(dict)
    local newest = dict:get(SEQ_KEY) or 0
    local cursor = newest + 1       -- next seq to deliver
    local aligned = true            -- cursor is where a batch starts (or will start)
    local lost = 0                  -- records skipped since the last delivered one

    if want_ring ~= nil and string.lower(want_ring) ~= ring_id then
        cursor = 1                  -- another ring (nginx restarted): all this one holds
    elseif after ~= nil then
        local n = tonumber(after)
        if n < newest then
            cursor, aligned = n + 1, false
        end
    end

    ngx.header.content_type = "application/x-ndjson"
    ngx.header["Cache-Control"] = "no-store"
    ngx.header["X-Accel-Buffering"] = "no"
    ngx.header["X-Sfive-Protocol"] = tostring(PROTOCOL)
    ngx.header["X-Sfive-Ring"] = ring_id
    local ok, err = ngx.on_abort(on_abort)
    if not ok then
        warn_once("abort", "ngx.on_abort: ", err,
                  " (put 'lua_check_client_abort on;' in the sfive location)")
    end
    ngx.send_headers()
    if method == "HEAD" then
        return ngx.exit(ngx.HTTP_OK)
    end
    ok = ngx.flush(true)
    if not ok then
        return
    end

    local out, nout = {}, 0
    local pending_since
    local exiting = ngx.worker.exiting
    local now = ngx.now
    local drain_start               -- when this stream saw its worker exiting (either thread)
    local guard = ngx.thread.spawn(function()
        while not exiting() do
            ngx.sleep(GUARD_POLL)
        end
        drain_start = drain_start or now()
        local limit = config.drain_max + DRAIN_GRACE
        local wait = drain_start + limit - now()
        if wait > 0 then
            ngx.sleep(wait)
        end
        ngx.log(ngx.WARN, "sfive: the subscriber did not take the stream's end within ",
                limit, " s of the worker's exit (drain_max + ", DRAIN_GRACE, "): closing its ",
                "connection so that the worker can exit; it resumes after the last record it ",
                "got (a reload keeps the ring, a stop does not)")
        return ngx.exit(444)
    end)
    local hb_interval = config.heartbeat_interval
    local hb_slack = CLOCK_SLACK + config.flush_interval
    local next_hb = 0               -- when the next heartbeat is due (v2): at once
    local hb_time = 0               -- the last heartbeat's T (never goes back)
    local last_batch                -- the batch holding the last record delivered
    local quiet_since, drain_newest
    while true do
        newest = dict:get(SEQ_KEY) or newest
        local oldest = oldest_held(dict, newest, ring)
        if cursor < oldest then
            lost = lost + (oldest - cursor)
            cursor, aligned = oldest, false
        end
        local sent = 0
        local waiting = false       -- stopped at a numbered but not yet stored record
        while cursor <= newest and sent < batch_max do
            local batch, first = dict:get(BATCH .. cursor), cursor
            if not batch and not aligned then
                batch, first = find_batch(dict, cursor)
            end
            if not batch then
                -- not stored: not yet (another worker is between incr and safe_set), never (a
                -- full dict, a worker that died in between), or deleted (lapped by the ring:
                -- then it is below the oldest held, and the gap is known at once)
                local t = now()
                newest = dict:get(SEQ_KEY) or newest
                local oldest = oldest_held(dict, newest, ring)
                if cursor < oldest then
                    lost = lost + (oldest - cursor)
                    cursor, aligned = oldest, false
                else
                    pending_since = pending_since or t
                    if t - pending_since < config.pending_timeout then
                        waiting = true
                        break
                    end
                    pending_since = nil
                    batch, first = next_batch(dict, cursor, newest)
                    local skip_to = first or min(cursor + MAX_BATCH, newest + 1)
                    lost = lost + (skip_to - cursor)
                    cursor, aligned = skip_to, true
                end
            end
            if batch then
                local last = batch_last(batch) or cursor
                if first < cursor then
                    batch = sub(batch, line_at(batch, cursor) or #batch + 1)
                end
                if lost > 0 then
                    nout = nout + 1
                    out[nout] = gap_line(lost, cursor)
                    lost = 0
                end
                nout = nout + 1
                out[nout] = batch
                last_batch = batch
                sent = sent + (last - cursor + 1)
                cursor, aligned = last + 1, true
                pending_since = nil
            end
        end
        local t = now()
        local finished = false
        if quiet_since == nil and (drain_start or exiting()) then
            drain_start = drain_start or t
            quiet_since, drain_newest = t, newest
        end
        if quiet_since ~= nil then
            -- the worker is exiting: go on until the ring has been quiet for a moment
            if newest ~= drain_newest or waiting or cursor <= newest then
                drain_newest, quiet_since = newest, t
            end
            finished = t - quiet_since >= config.drain_quiet
                or t - drain_start >= config.drain_max
        end
        if v2 and lost > 0 and not waiting then
            -- v2 hears of a loss at once (v1 only before the next record, as it always did)
            nout = nout + 1
            out[nout] = gap_line(lost, cursor)
            lost = 0
        end
        if v2 and (t >= next_hb or finished) then
            -- S: the last seq delivered (lost records not yet announced are not "had").
            -- T: caught up, every record numbered later was logged after now - hb_slack (its
            -- buffering included); otherwise records after S were logged after S's time minus
            -- hb_slack.
            local s = cursor - 1 - lost
            local promise
            if cursor > newest and not waiting then
                promise = t - hb_slack
            else
                local batch = last_batch
                if batch == nil and s > 0 then
                    batch = find_batch(dict, s)
                end
                local pos = batch and line_at(batch, s)
                local lt = pos and line_time(batch, pos)
                promise = lt and lt - hb_slack
            end
            if promise and promise > hb_time then
                hb_time = floor(promise * 1000) / 1000
            end
            nout = nout + 1
            out[nout] = format('{"seq":%d,"hb":%.3f%s}\n', s, hb_time,
                               history(dict, newest, ring))
            next_hb = t + hb_interval
        end
        if nout > 0 then
            ok = ngx.print(out)
            if ok then
                ok = ngx.flush(true)
            end
            for i = 1, nout do
                out[i] = nil
            end
            nout = 0
            if not ok then
                -- timed out (send_timeout) or gone: close now, not after another send_timeout
                return ngx.exit(444)
            end
        end
        if finished then
            ngx.thread.kill(guard)
            return
        end
        if sent < batch_max then
            ngx.sleep(config.poll_interval)
        else
            ngx.sleep(0.001)  -- more is waiting; let the worker's other events run first
        end
    end
end

return M
