# On hosts every downloaded artifact is pinned by its sha256 digest, so what
# runs is exactly what the commit names. (The host target refuses unpinned
# downloads as well; this rule reports them with the plan, before anything.)
package sluice.guardrails.artifacts

import data.sluice.lib

deny contains msg if {
	lib.is_host
	input.kind == "Process"
	some a in input.spec.artifacts
	a.url
	not pinned(a)
	msg := sprintf("%s: artifact %q is downloaded from %s without a sha256 digest", [lib.name, a.name, a.url])
}

pinned(a) if {
	is_string(a.sha256)
	regex.match(`^[0-9a-fA-F]{64}$`, a.sha256)
}
