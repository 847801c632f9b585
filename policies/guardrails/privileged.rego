# No privileged containers: a privileged container is root on its node.
# Allow with the label sluice.dev/allow-privileged: "true".
package sluice.guardrails.privileged

import data.sluice.lib

deny contains msg if {
	not lib.allowed("privileged")
	some c in lib.containers
	c.securityContext.privileged == true
	msg := sprintf("%s: container %q is privileged", [lib.name, c.name])
}

deny contains msg if {
	not lib.allowed("privileged")
	some c in lib.containers
	some cap in c.securityContext.capabilities.add
	upper(cap) in {"SYS_ADMIN", "CAP_SYS_ADMIN", "ALL"}
	msg := sprintf("%s: container %q adds the capability %s", [lib.name, c.name, cap])
}

warn contains msg if {
	not lib.allowed("privileged")
	lib.pod_spec.hostNetwork == true
	msg := sprintf("%s: uses the host's network namespace", [lib.name])
}
