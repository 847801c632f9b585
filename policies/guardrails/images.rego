# No mutable image tags: `:latest`, or no tag and no digest, can change under
# a deployed commit, so git would no longer say what runs. Allow one with
# the label sluice.dev/allow-mutable-tag: "true".
package sluice.guardrails.images

import data.sluice.lib

mutable(image) if {
	not contains(image, "@sha256:")
	endswith(image, ":latest")
}

mutable(image) if {
	not contains(image, "@")
	parts := split(image, "/")
	not contains(parts[count(parts) - 1], ":")
}

deny contains msg if {
	not lib.allowed("mutable-tag")
	some c in lib.containers
	mutable(c.image)
	msg := sprintf("%s: container %q uses the mutable image %q; pin a version tag or a digest", [lib.name, c.name, c.image])
}

deny contains msg if {
	lib.is_host
	input.kind == "Process"
	not lib.allowed("mutable-tag")
	input.spec.version == "latest"
	msg := sprintf("%s: version \"latest\" is mutable; name the version that runs", [lib.name])
}
