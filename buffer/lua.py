"""The two server-side scripts of the replay service: an atomic batch insert and an exact sampler.

Why the priority index is the `prio` ZSET itself, sampled by bucketed rejection
-------------------------------------------------------------------------------
We need P(i) ∝ exp(s_i / T) over up to millions of items, with many writers and readers, with
no per-call O(N) work in Redis and nothing for clients to keep in step. Alternatives rejected:

* a sum tree in Redis stores exp(s/T), so T is fixed at write time, the values over/underflow
  when log-rewards drift (r/β spans hundreds of nats), and each insert touches log2 N nodes;
* a client-side index must replay every other client's inserts and evictions to stay exact.

The ZSET is already sorted by s, so items whose score lies in a band are a contiguous run of
ranks, found with ZCOUNT in O(log N). Cut the range below the best score `top` into K bands
of width w·T (the last band is an unbounded tail) and sample exactly by rejection:

    1. pick band k with probability ∝ count_k · exp((b_k − top)/T), b_k its upper edge;
    2. pick a rank uniformly inside band k (ZRANGE rank rank, O(log N));
    3. accept item i with probability exp((s_i − b_k)/T) ≤ 1, else start again.

Then P(i) ∝ exp((s_i − top)/T): exactly the softmax, for any T, and only differences of
scores are ever exponentiated. An attempt in a band is accepted with probability ≥ e^−w; the
tail (items worse than top − K·w·T) weighs ≤ e^−K·w per item and is rarely chosen. So a call
costs O((K + n) log N) whatever N is: K ZCOUNTs plus about 1.2–1.6 n ZRANGEs. The uniforms
come from the client (numpy, seeded), packed as doubles, so draws are reproducible with 53-bit
resolution. Blobs are read in the same script, so a sampled id cannot be evicted between being
chosen and being read.
"""
from __future__ import annotations

#: bands of width BAND_WIDTH·T below the best score; beyond K·w·T everything is one tail band
NUM_BANDS = 48
BAND_WIDTH = 0.5
#: uniforms per rejection attempt (band, rank, accept)
UNIFORMS_PER_ATTEMPT = 3

# KEYS: prio, meta, fresh, dedup, order
# ARGV (buffer/batch.py add_args): traj-key prefix, capacity, dedup 0|1, fifo 0|1, fresh maxlen, n,
#       then per trajectory: id, score, dedup sha, 2·nfields, field, value, … (blob is the last value)
# Returns {stored, duplicates, evicted, repeats}.
ADD = r"""
local prio, meta, fresh, dedupk, order = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local prefix = ARGV[1]
local capacity = tonumber(ARGV[2])
local use_dedup = ARGV[3] == '1'
local fifo = ARGV[4] == '1'
local maxlen = ARGV[5]
local n = tonumber(ARGV[6])

-- redis.call over a long argument list, in chunks (Lua's unpack has a stack limit)
local function chunked(head, args, step)
  local out = {}
  for s = 1, #args, step do
    local t = {}
    for i = 1, #head do t[#t + 1] = head[i] end
    for i = s, math.min(s + step - 1, #args) do t[#t + 1] = args[i] end
    local r = redis.call(unpack(t))
    if type(r) == 'table' then for i = 1, #r do out[#out + 1] = r[i] end end
  end
  return out
end

-- parse and validate everything before the first write: a bad batch changes nothing
local ids, sargs, scores, shas, fstart, fend = {}, {}, {}, {}, {}, {}
local p = 7
for i = 1, n do
  ids[i], sargs[i], shas[i] = ARGV[p], ARGV[p + 1], ARGV[p + 2]
  scores[i] = tonumber(sargs[i])
  local nf = tonumber(ARGV[p + 3])
  if scores[i] == nil or scores[i] ~= scores[i] or nf == nil or nf < 2 then
    return redis.error_reply('ERR pag add: malformed trajectory ' .. tostring(ids[i]))
  end
  fstart[i], fend[i] = p + 4, p + 3 + nf
  p = p + 4 + nf
end

-- reads, batched
local stored = chunked({'ZMSCORE', prio}, ids, 1000)
local olds, oldscore = {}, {}
if use_dedup then
  olds = chunked({'HMGET', dedupk}, shas, 1000)
  local q = {}
  for i = 1, n do if olds[i] then q[#q + 1] = olds[i] end end
  if #q > 0 then
    local qs = chunked({'ZMSCORE', prio}, q, 1000)
    for j = 1, #q do if qs[j] then oldscore[q[j]] = tonumber(qs[j]) end end
  end
end

-- decide: repeats of stored ids are ignored; duplicates keep the higher reward
local keep, announce, seen, best = {}, {}, {}, {}
local removed, removed_set = {}, {}
local dup, repeats = 0, 0
for i = 1, n do
  local id = ids[i]
  if stored[i] or seen[id] then
    repeats = repeats + 1
  else
    seen[id] = true
    announce[i] = true
    local ok = true
    if use_dedup then
      local cur = best[shas[i]]
      if cur == nil and olds[i] and oldscore[olds[i]] then
        cur = {id = olds[i], score = oldscore[olds[i]]}
      end
      if cur then
        dup = dup + 1
        if cur.score >= scores[i] then
          ok = false
        elseif cur.i then
          keep[cur.i] = nil
        else
          removed[#removed + 1] = {id = cur.id, sha = shas[i]}
          removed_set[cur.id] = true
        end
      end
      if ok then best[shas[i]] = {i = i, id = id, score = scores[i]} end
    end
    if ok then keep[i] = true end
  end
end

-- capacity: choose victims among existing and incoming items together
local nkeep = 0
for i = 1, n do if keep[i] then nkeep = nkeep + 1 end end
local excess = redis.call('ZCARD', prio) - #removed + nkeep - capacity
local victims, evicted = {}, 0
if excess > 0 then
  local k = excess + #removed
  if fifo then
    local oldest = redis.call('ZRANGE', order, 0, k - 1)
    for j = 1, #oldest do
      if excess == 0 then break end
      if not removed_set[oldest[j]] then victims[#victims + 1] = oldest[j]; excess = excess - 1 end
    end
    for i = 1, n do
      if excess == 0 then break end
      if keep[i] then keep[i] = nil; excess = excess - 1; evicted = evicted + 1 end
    end
  else
    local low = redis.call('ZRANGE', prio, 0, k - 1, 'WITHSCORES')
    local cand = {}
    for j = 1, #low, 2 do
      if not removed_set[low[j]] then cand[#cand + 1] = {s = tonumber(low[j + 1]), id = low[j], o = j} end
    end
    for i = 1, n do if keep[i] then cand[#cand + 1] = {s = scores[i], i = i, o = -i} end end
    -- lowest score first; on a tie the newcomer leaves first (o < 0), then by position
    table.sort(cand, function(a, b) if a.s ~= b.s then return a.s < b.s end return a.o < b.o end)
    for j = 1, math.min(excess, #cand) do
      local c = cand[j]
      if c.i then keep[c.i] = nil; evicted = evicted + 1 else victims[#victims + 1] = c.id end
    end
  end
end

-- writes
for _, r in ipairs(removed) do
  redis.call('UNLINK', prefix .. r.id)
  local b = best[r.sha]
  if not (b and b.i and keep[b.i]) then
    if redis.call('HGET', dedupk, r.sha) == r.id then redis.call('HDEL', dedupk, r.sha) end
  end
end
for _, v in ipairs(victims) do
  local key = prefix .. v
  if use_dedup then
    local pr = redis.call('HMGET', key, 'prompt', 'response')
    if pr[1] and pr[2] then
      local sha = redis.sha1hex(pr[1] .. '\0' .. pr[2])
      if redis.call('HGET', dedupk, sha) == v then redis.call('HDEL', dedupk, sha) end
    end
  end
  redis.call('UNLINK', key)
end
local gone = {}
for _, r in ipairs(removed) do gone[#gone + 1] = r.id end
for _, v in ipairs(victims) do gone[#gone + 1] = v end
if #gone > 0 then
  chunked({'ZREM', prio}, gone, 1000)
  if fifo then chunked({'ZREM', order}, gone, 1000) end
end

local zargs, dargs, oargs = {}, {}, {}
local nstored = 0
for i = 1, n do if keep[i] then nstored = nstored + 1 end end
local seq = 0
if fifo and nstored > 0 then seq = redis.call('HINCRBY', meta, 'seq', nstored) - nstored end
for i = 1, n do
  if keep[i] then
    redis.call('HSET', prefix .. ids[i], unpack(ARGV, fstart[i], fend[i]))
    zargs[#zargs + 1] = sargs[i]; zargs[#zargs + 1] = ids[i]
    if use_dedup then dargs[#dargs + 1] = shas[i]; dargs[#dargs + 1] = ids[i] end
    if fifo then seq = seq + 1; oargs[#oargs + 1] = seq; oargs[#oargs + 1] = ids[i] end
  end
end
if #zargs > 0 then chunked({'ZADD', prio}, zargs, 1000) end
if #dargs > 0 then chunked({'HSET', dedupk}, dargs, 1000) end
if #oargs > 0 then chunked({'ZADD', order}, oargs, 1000) end

-- every new id is announced to the learner's online half: by id when it is stored here,
-- with its blob when dedup or eviction kept it out
for i = 1, n do
  if keep[i] then
    redis.call('XADD', fresh, 'MAXLEN', '~', maxlen, '*', 'id', ids[i], 'log_reward', sargs[i])
  elseif announce[i] then
    redis.call('XADD', fresh, 'MAXLEN', '~', maxlen, '*',
               'id', ids[i], 'log_reward', sargs[i], 'blob', ARGV[fend[i]])
  end
end

evicted = evicted + #victims
if nstored > 0 then redis.call('HINCRBY', meta, 'added', nstored) end
if dup > 0 then redis.call('HINCRBY', meta, 'duplicates', dup) end
if evicted > 0 then redis.call('HINCRBY', meta, 'evicted', evicted) end
if repeats > 0 then redis.call('HINCRBY', meta, 'repeats', repeats) end
return {nstored, dup, evicted, repeats}
"""

# KEYS: prio
# ARGV: traj-key prefix, n, mode 'reward'|'uniform', T, K, w, uniforms (packed little-endian doubles)
# Returns {ids drawn (≤ n: fewer when the uniforms ran out), unique ids, their blobs (false if missing)}.
SAMPLE = r"""
local prio = KEYS[1]
local prefix = ARGV[1]
local n = tonumber(ARGV[2])
local uniform = ARGV[3] == 'uniform'
local T, K, w = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local buf = ARGV[7]
local pos, nu = 1, #buf / 8
local used = 0
local function rnd()
  if used >= nu then return nil end
  used = used + 1
  local u
  u, pos = struct.unpack('<d', buf, pos)
  return u
end
local function at(rank)
  local r = redis.call('ZRANGE', prio, rank, rank, 'WITHSCORES')
  return r[1], tonumber(r[2])
end

local N = redis.call('ZCARD', prio)
local picks = {}
if N > 0 and n > 0 then
  if uniform then
    while #picks < n do
      local u = rnd()
      if u == nil then break end
      picks[#picks + 1] = at(math.min(N - 1, math.floor(u * N)))
    end
  else
    local _, top = at(N - 1)
    local _, bottom = at(0)
    -- band k covers scores in (b[k+1], b[k]]; band K+1 is the tail (-inf, b[K+1]]
    local b, L, cum = {top}, {N}, {}
    for k = 2, K + 1 do
      local edge = string.format('%.17g', top - (k - 1) * w * T)
      b[k] = tonumber(edge)
      if b[k] < bottom then L[k] = 0 else L[k] = redis.call('ZCOUNT', prio, '-inf', edge) end
    end
    L[K + 2] = 0
    local total = 0
    for k = 1, K + 1 do
      total = total + (L[k] - L[k + 1]) * math.exp((b[k] - top) / T)
      cum[k] = total
    end
    while #picks < n do
      local u1, u2, u3 = rnd(), rnd(), rnd()
      if u3 == nil then break end
      local x = u1 * total
      local lo, hi = 1, K + 1
      while lo < hi do
        local m = math.floor((lo + hi) / 2)
        if cum[m] > x then hi = m else lo = m + 1 end
      end
      local first, count = L[lo + 1], L[lo] - L[lo + 1]
      if count > 0 then
        local id, s = at(first + math.min(count - 1, math.floor(u2 * count)))
        if u3 < math.exp((s - b[lo]) / T) then picks[#picks + 1] = id end
      end
    end
  end
end

local uniq, blobs, have = {}, {}, {}
for j = 1, #picks do
  local id = picks[j]
  if not have[id] then
    have[id] = true
    uniq[#uniq + 1] = id
    blobs[#blobs + 1] = redis.call('HGET', prefix .. id, 'blob')
  end
end
return {picks, uniq, blobs}
"""
