-- wrk: one token per request, cycling through a file of tokens (one per line), each wrk thread
-- from its own starting point. Usage: wrk -s benches/wrk_tokens.lua URL -- TOKENS_FILE
local tokens = {}
local at = 1

function init(args)
  for line in io.lines(args[1]) do
    tokens[#tokens + 1] = line
  end
  at = math.random(#tokens)
end

function request()
  at = at % #tokens + 1
  return wrk.format("GET", "/", { ["authorization"] = "Bearer " .. tokens[at] })
end
