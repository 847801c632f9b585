# Containers need resource limits: one container without a memory limit can
# starve every other workload on its node. Allow with the label
# sluice.dev/allow-no-limits: "true".
package sluice.guardrails.resources

deny contains msg if {
	input.kind in data.sluice.guardrails.workload.kinds
	some c in data.sluice.guardrails.workload.containers
	not c.resources.limits.memory
	not allowed
	msg := sprintf("%s/%s: container %q has no memory limit (resources.limits.memory)", [input.kind, input.metadata.name, c.name])
}

warn contains msg if {
	input.kind in data.sluice.guardrails.workload.kinds
	some c in data.sluice.guardrails.workload.containers
	not c.resources.limits.cpu
	not c.resources.requests.cpu
	not allowed
	msg := sprintf("%s/%s: container %q has neither a CPU request nor a CPU limit", [input.kind, input.metadata.name, c.name])
}

allowed if input.metadata.labels["sluice.dev/allow-no-limits"] == "true"
