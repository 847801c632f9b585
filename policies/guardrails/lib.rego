# Helpers for your policies: import data.sluice.lib.
package sluice.lib

import data.sluice.guardrails.workload

# The pod spec of a workload, whatever kind wraps it.
pod_spec := workload.pod_spec

# Every container of the workload: init, regular and ephemeral.
containers := workload.containers

# A label `sluice.dev/allow-<what>: "true"` on the resource allows an exception.
allowed(what) if input.metadata.labels[concat("", ["sluice.dev/allow-", what])] == "true"

# The name conftest users expect in messages.
name := sprintf("%s/%s", [input.kind, input.metadata.name])

is_host if input.apiVersion == "sluice.dev/v1"
