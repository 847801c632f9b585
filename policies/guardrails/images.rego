# No mutable image tags: `:latest`, or no tag and no digest, can change under
# a deployed commit, so git would no longer say what runs. Allow one with
# the label sluice.dev/allow-mutable-tag: "true".
package sluice.guardrails.images

deny contains msg if {
	input.kind in data.sluice.guardrails.workload.kinds
	some c in data.sluice.guardrails.workload.containers
	mutable(c.image)
	not allowed
	msg := sprintf("%s/%s: container %q uses the mutable image %q; pin a version tag or a digest", [input.kind, input.metadata.name, c.name, c.image])
}

deny contains msg if {
	input.kind == "Process"
	input.apiVersion == "sluice.dev/v1"
	input.spec.version == "latest"
	not allowed
	msg := sprintf("%s/%s: version \"latest\" is mutable; name the version that runs", [input.kind, input.metadata.name])
}

allowed if input.metadata.labels["sluice.dev/allow-mutable-tag"] == "true"

mutable(image) if {
	not contains(image, "@sha256:")
	endswith(image, ":latest")
}

mutable(image) if {
	not contains(image, "@")
	parts := split(image, "/")
	not contains(parts[count(parts) - 1], ":")
}
