# On hosts every downloaded artifact is pinned by its sha256 digest, so what
# runs is exactly what the commit names. (The host target refuses unpinned
# downloads as well; this rule reports them with the plan, before anything.)
package sluice.guardrails.artifacts

deny contains msg if {
	input.kind == "Process"
	input.apiVersion == "sluice.dev/v1"
	some a in input.spec.artifacts
	a.url
	not pinned(a)
	msg := sprintf("%s/%s: artifact %q is downloaded from %s without a sha256 digest", [input.kind, input.metadata.name, a.name, a.url])
}

pinned(a) if {
	is_string(a.sha256)
	regex.match(`^[0-9a-fA-F]{64}$`, a.sha256)
}
