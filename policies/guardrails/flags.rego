# Feature flags are debt: each needs an owner to ask and a date by which it
# goes away. (Input: the flags.yaml document.)
package sluice.guardrails.flags

deny contains msg if {
	input.kind == "Flags"
	some name, flag in input.flags
	not nonempty(flag.owner)
	msg := sprintf("flag %q has no owner", [name])
}

deny contains msg if {
	input.kind == "Flags"
	some name, flag in input.flags
	not flag.expires
	msg := sprintf("flag %q has no expiry date (expires: YYYY-MM-DD)", [name])
}

nonempty(s) if trim_space(s) != ""
