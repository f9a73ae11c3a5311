"""Runs every query of a namespace's rendered Grafana dashboard the way
Grafana would: through the datasource's URL (here via the API server's
Service proxy), with the dashboard's variables substituted, over the
dashboard's time range. Exits non-zero, saying which, when a query returns
no data, when a panel points at another datasource, or when the variable
does not list the apps.

    python3 tests/e2e/dashboard_queries.py NAMESPACE "frontend api"
"""

import json
import re
import subprocess
import sys
import time
import urllib.parse

OWNER = "metrics.chiller.io/owner-namespace"


def kubectl_json(*args):
    out = subprocess.run(["kubectl", *args, "-o", "json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def one_config_map(label, namespace):
    items = kubectl_json("get", "configmap", "-A", "-l", f"{label}=1,{OWNER}={namespace}")["items"]
    if len(items) != 1:
        sys.exit(f"expected one ConfigMap labeled {label} for {namespace}, found {len(items)}")
    return next(iter(items[0]["data"].values()))


def seconds(duration):
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def main():
    namespace, apps = sys.argv[1], set(sys.argv[2].split())
    datasource = one_config_map("grafana_datasource", namespace)
    dashboard = json.loads(one_config_map("grafana_dashboard", namespace))

    url = re.search(r"^\s*url:\s*(\S+)", datasource, re.M).group(1).strip("'\"")
    uid = re.search(r"^\s*uid:\s*(\S+)", datasource, re.M).group(1).strip("'\"")
    found = re.search(r"timeInterval:\s*['\"]?(\w+)", datasource)
    scrape = seconds(found.group(1)) if found else 15
    parsed = urllib.parse.urlsplit(url)
    service, service_namespace = parsed.hostname.split(".")[:2]
    if service_namespace != namespace:
        sys.exit(f"the datasource of {namespace} points at namespace {service_namespace}: {url}")
    # The datasource's URL, reached through the API server's Service proxy.
    base = f"/api/v1/namespaces/{service_namespace}/services/{parsed.scheme}:{service}:{parsed.port}/proxy"

    def get(path, **params):
        out = subprocess.run(
            ["kubectl", "get", "--raw", f"{base}{path}?{urllib.parse.urlencode(params, doseq=True)}"],
            check=True, capture_output=True, text=True)
        return json.loads(out.stdout)["data"]

    # The dashboard's range is the last hour; at that range Grafana's
    # $__interval is the datasource's timeInterval (its floor), so
    # $__rate_interval = max($__interval + scrape, 4 * scrape).
    end = time.time()
    start = end - 3600
    interval = scrape
    rate_interval = max(interval + scrape, 4 * scrape)

    variables = {}
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query).groups()
        values = set(get(f"/api/v1/label/{label}/values", **{"match[]": metric}))
        print(f"${variable['name']}: {sorted(values)}")
        if not apps <= values:
            sys.exit(f"variable {variable['name']} lists {sorted(values)}, not all of {sorted(apps)}")
        # "All" is selected: Grafana puts in the variable's allValue.
        variables[variable["name"]] = variable.get("allValue") or "|".join(sorted(values))

    def substitute(expr):
        expr = expr.replace("$__rate_interval", f"{rate_interval}s").replace("$__interval", f"{interval}s")
        for name, value in variables.items():
            expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
        if "$" in expr:
            sys.exit(f"a variable is left in: {expr}")
        return expr

    failures = []
    for panel in dashboard["panels"]:
        panel_uid = (panel.get("datasource") or {}).get("uid")
        if panel_uid != uid:
            failures.append(f"panel {panel['title']!r} uses datasource {panel_uid!r}, not {uid!r}")
        for target in panel.get("targets", []):
            expr = substitute(target["expr"])
            result = get("/api/v1/query_range", query=expr, start=start, end=end, step=interval)["result"]
            values = sum(len(series["values"]) for series in result)
            print(f"{panel['title']}: {len(result)} series, {values} points: {expr}")
            if not result:
                failures.append(f"panel {panel['title']!r}: no data for {expr}")
            for series in result:
                series_namespace = series["metric"].get("namespace", namespace)
                if series_namespace != namespace:
                    failures.append(f"panel {panel['title']!r}: a series of {series_namespace}")
    if failures:
        sys.exit("\n".join(failures))


if __name__ == "__main__":
    main()
