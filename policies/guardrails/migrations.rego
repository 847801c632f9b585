# Expand/contract: a resource marked as a schema migration (label
# sluice.dev/migration: "true") never rolls in the same wave as the code that
# depends on it. Put the migration in its own service and make the code's
# service dependsOn it: the migration's wave then passes its gate first.
# Uses the change context (data.sluice.context) and the plan (data.sluice.plan).
package sluice.guardrails.migrations

deny contains msg if {
	input.metadata.labels["sluice.dev/migration"] == "true"
	ctx := data.sluice.context
	some other in data.sluice.plan.waves[ctx.wave.index].resources
	not migration(other)
	other.target == ctx.target
	depends_on_migration(other.service, ctx)
	msg := sprintf("%s/%s: schema migration rolls in wave %d together with %s/%s of service %q, which depends on it; move the migration to its own service and make %q dependsOn it", [input.kind, input.metadata.name, ctx.wave.index + 1, other.kind, other.name, other.service, other.service])
}

migration(r) if r.labels["sluice.dev/migration"] == "true"

depends_on_migration(service, ctx) if service == ctx.service

depends_on_migration(service, ctx) if service in ctx.dependents
