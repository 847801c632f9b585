"""Evaluates sluice's guardrail job in a real OPA (the PyPI package
opa-golib-python-bindings: OPA's Go engine behind ctypes) and prints its
findings and speed as JSON, for benches/plan.rs.

Every verdict rule of every module is evaluated for every input with the
input's change context as data.sluice.context, one call into Go per input.
The binding's own cost per call (JSON both ways, ctypes) is measured with
the same inputs and a query that evaluates nothing, so OPA's evaluation
time is the difference.
Install: pip install opa-golib-python-bindings (add
--ignore-requires-python on Python older than 3.14; only its metadata asks
for 3.14).
"""

import json
import re
import sys
import time

from opa_bindings import OpaEngine, OpaUndefinedError

job = json.load(open(sys.argv[1]))
engine = OpaEngine()
rules = []
for m in job["modules"]:
    engine.add_policy(m["path"], m["source"])
    package = re.search(r"^package\s+([\w.]+)", m["source"], re.M).group(1)
    for name in sorted(set(re.findall(r"^((?:deny|violation|warn)(?:_[A-Za-z0-9]+)*)\s+(?:contains|:=|=|\[|if)", m["source"], re.M))):
        rules.append(f"data.{package}.{name}")
rules = sorted(set(rules))
collector = ["package sluice_bench", ""]
for i, r in enumerate(rules):
    collector.append(f"results contains [{i}, v] if {{ v := {r} }}")
engine.add_policy("sluice_bench.rego", "\n".join(collector) + "\n")
engine.add_data({"sluice": {"plan": job["plan"]}})
# One call per input, as an agent would evaluate one manifest: the query
# string is fixed, so OPA prepares it once.
query = "x := data.sluice_bench.results with data.sluice.context as input.ctx with input as input.doc"
findings = []
start = time.perf_counter()
for k, one in enumerate(job["inputs"]):
    for binding in engine.eval_query(query, input=one):
        for i, value in binding.get("x", []):
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict):
                    item = item.get("msg")
                if isinstance(item, str):
                    findings.append([k, rules[i], item])
elapsed = time.perf_counter() - start
# What the binding itself costs per call (JSON and ctypes both ways), with
# the same inputs and a query that evaluates nothing.
start = time.perf_counter()
for one in job["inputs"]:
    engine.eval_query("x := 1", input=one)
floor = time.perf_counter() - start
n = max(1, len(job["inputs"]))
print(json.dumps({
    "opa": "OPA in Go via opa-golib-python-bindings",
    "us_per_input": elapsed * 1e6 / n,
    "binding_us_per_input": floor * 1e6 / n,
    "findings": findings,
}))
