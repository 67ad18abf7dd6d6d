-- Argo CD health of a shadowctl.dev/ShadowPolicy, from the phase the controller writes to .status.
-- Argo CD runs it with gopher-lua (Lua 5.1) and only the base and table libraries: no string methods.
--   Progressing  Shadowing, Progressing (canary steps), Promoting; before the controller has seen
--                the current generation
--   Suspended    WaitingPromotion (a person must run `shadowctl promote`), Paused
--   Healthy      Succeeded; Pending once the controller has looked (nothing to roll out)
--   Degraded     RollingBack, RolledBack, Failed; and any phase whose Ready condition is False
--                (the controller cannot act: its message says why)
--   Unknown      a phase this script does not know (a newer controller)
-- The message is the phase, the canary step, and the controller's own message.
local health = {
  Pending = "Healthy",
  Shadowing = "Progressing",
  Progressing = "Progressing",
  WaitingPromotion = "Suspended",
  Promoting = "Progressing",
  Succeeded = "Healthy",
  RollingBack = "Degraded",
  RolledBack = "Degraded",
  Paused = "Suspended",
  Failed = "Degraded",
}

hs = {}
local status = obj.status
if type(status) ~= "table" or type(status.phase) ~= "string" then
  hs.status = "Progressing"
  hs.message = "Waiting for the shadowctl controller to report a phase"
  return hs
end

local generation = nil
if type(obj.metadata) == "table" and type(obj.metadata.generation) == "number" then
  generation = obj.metadata.generation
end
local observed = status.observedGeneration
if generation ~= nil and type(observed) == "number" and observed < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the shadowctl controller to observe generation " .. tostring(generation)
  return hs
end

local phase = status.phase
local text = phase
if type(status.step) == "number" and (phase == "Progressing" or phase == "WaitingPromotion" or phase == "Paused") then
  text = text .. " (step " .. tostring(status.step)
  local canary = type(obj.spec) == "table" and obj.spec.canary or nil
  if type(canary) == "table" and type(canary.steps) == "table" and #canary.steps > 0 then
    text = text .. "/" .. tostring(#canary.steps)
  end
  if type(status.canaryWeight) == "number" then
    text = text .. ", " .. tostring(status.canaryWeight) .. "% to the candidate"
  end
  text = text .. ")"
end
if type(status.message) == "string" and status.message ~= "" then
  text = text .. ": " .. status.message
end

if type(status.conditions) == "table" then
  for _, condition in ipairs(status.conditions) do
    if type(condition) == "table" and condition.type == "Ready" and condition.status == "False" then
      hs.status = "Degraded"
      hs.message = text .. "; the controller cannot act: " .. tostring(condition.message)
      return hs
    end
  end
end

hs.status = health[phase]
if hs.status == nil then
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. text
  return hs
end
hs.message = text
return hs
