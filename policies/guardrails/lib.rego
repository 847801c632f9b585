# Helpers for the default guardrails (and for yours: import data.sluice.lib).
package sluice.lib

# The pod spec of a workload, whatever kind wraps it.
pod_spec := input.spec if input.kind == "Pod"

pod_spec := input.spec.template.spec if {
	input.kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
}

pod_spec := input.spec.jobTemplate.spec.template.spec if input.kind == "CronJob"

# Every container of the workload: init, regular and ephemeral.
containers contains c if {
	some field in ["initContainers", "containers", "ephemeralContainers"]
	some c in pod_spec[field]
}

# A label `sluice.dev/allow-<what>: "true"` on the resource allows an exception.
allowed(what) if input.metadata.labels[concat("", ["sluice.dev/allow-", what])] == "true"

# The name conftest users expect in messages.
name := sprintf("%s/%s", [input.kind, input.metadata.name])

is_host if input.apiVersion == "sluice.dev/v1"
