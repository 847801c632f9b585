# The pod spec and the containers of a workload, whatever kind wraps it.
# Shared by the shipped guardrails and by sluice.lib.
#
# The guardrails test `input.kind in data.sluice.guardrails.workload.kinds`
# first, so a document of any other kind costs one lookup, and they name
# these rules by their full `data.` path: regorus's compiled engine calls a
# rule named so directly, where an import alias makes it look the path up
# in the whole data document on every use.
package sluice.guardrails.workload

kinds := {"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController", "CronJob"}

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
