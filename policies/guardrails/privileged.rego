# No privileged containers: a privileged container is root on its node.
# Allow with the label sluice.dev/allow-privileged: "true".
package sluice.guardrails.privileged

deny contains msg if {
	input.kind in data.sluice.guardrails.workload.kinds
	some c in data.sluice.guardrails.workload.containers
	c.securityContext.privileged == true
	not allowed
	msg := sprintf("%s/%s: container %q is privileged", [input.kind, input.metadata.name, c.name])
}

deny contains msg if {
	input.kind in data.sluice.guardrails.workload.kinds
	some c in data.sluice.guardrails.workload.containers
	some cap in c.securityContext.capabilities.add
	upper(cap) in {"SYS_ADMIN", "CAP_SYS_ADMIN", "ALL"}
	not allowed
	msg := sprintf("%s/%s: container %q adds the capability %s", [input.kind, input.metadata.name, c.name, cap])
}

warn contains msg if {
	input.kind in data.sluice.guardrails.workload.kinds
	data.sluice.guardrails.workload.pod_spec.hostNetwork == true
	not allowed
	msg := sprintf("%s/%s: uses the host's network namespace", [input.kind, input.metadata.name])
}

allowed if input.metadata.labels["sluice.dev/allow-privileged"] == "true"
