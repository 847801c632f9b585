# Containers need resource limits: one container without a memory limit can
# starve every other workload on its node. Allow with the label
# sluice.dev/allow-no-limits: "true".
package sluice.guardrails.resources

import data.sluice.lib

deny contains msg if {
	not lib.allowed("no-limits")
	some c in lib.containers
	not c.resources.limits.memory
	msg := sprintf("%s: container %q has no memory limit (resources.limits.memory)", [lib.name, c.name])
}

warn contains msg if {
	not lib.allowed("no-limits")
	some c in lib.containers
	not c.resources.limits.cpu
	not c.resources.requests.cpu
	msg := sprintf("%s: container %q has neither a CPU request nor a CPU limit", [lib.name, c.name])
}
