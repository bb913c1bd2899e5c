"""Generate poisonwatch's Grafana dashboards and alert rules from the definitions in this file.

Writes, relative to this folder:

- ``dashboards/*.json``: the dashboards, each with a ``datasource`` variable;
- ``prometheus/rules.yml``: the alert rules for Prometheus;
- ``provisioning/alerting/poisonwatch.yml``: the same rules as Grafana-managed
  alerts (query, reduce to the last value, threshold).

Run ``python grafana/generate.py`` after editing and commit the output;
``--check`` exits with status 1 when a committed file differs from what this
script generates. Each alert is defined once, as a PromQL query, a comparison
and a threshold, and both rule formats are rendered from that one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# The uid of the provisioned Prometheus data source. Dashboards reach it
# through their ``datasource`` variable; Grafana-managed alerts name it.
DATASOURCE_UID = "poisonwatch-prometheus"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# The scrape job that collects the daemon's /metrics; see prometheus/prometheus.yml.
SCRAPE_JOB = "poisonwatch"

DEFAULT_POISONWATCH_URL = "http://127.0.0.1:8000"
DEFAULT_RUNBOOK_URL = "docs/runbooks"

# Prometheus renames a scraped ``job`` label to ``exported_job`` because the
# target label ``job`` names the scrape job, so queries group by exported_job.
JOB_LABEL = "exported_job"

OPEN_STATES = "open|analyzing|analyzed"
REQUESTS = "poisonwatch_http_request_duration_seconds_count"
WRITE_ROUTES = 'route=~".*/(predictions|labels)"'


# --- dashboards ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"
    links: tuple[tuple[str, str], ...] = ()
    max_value: float | None = None


@dataclasses.dataclass(frozen=True)
class Section:
    """A titled row of panels; a new detector adds one section to a dashboard."""

    title: str
    panels: tuple[Panel, ...]


def rate(expr: str) -> str:
    return expr.replace("[$rate]", "[$__rate_interval]")


HELDOUT = Section(
    "Held-out accuracy",
    (
        Panel(
            "Held-out accuracy by model",
            "Latest held-out accuracy of each model's current version, from the held-out job. "
            "A drop after a release is a poisoning signal; the held-out accuracy alerts fire on a drop of 2 points.",
            "percentunit",
            (Query('max by (model) (poisonwatch_heldout_accuracy_ratio{model=~"$model"})', "{{model}}"),),
            max_value=1,
        ),
        Panel(
            "Held-out accuracy by class",
            "Latest held-out accuracy of each class. A targeted attack can lower one class only; "
            "the per-class alert fires on a drop of 10 points.",
            "percentunit",
            (Query('max by (model, class) (poisonwatch_heldout_class_accuracy_ratio{model=~"$model"})', "{{model}} class {{class}}"),),
            max_value=1,
        ),
    ),
)

INCIDENTS = Section(
    "Incidents and influence analyses",
    (
        Panel(
            "Open incidents",
            "Unexpected high-confidence misclassifications not yet acknowledged (states open, analyzing, analyzed).",
            "none",
            (Query(f'sum by (model) (max by (model, state) (poisonwatch_incidents{{model=~"$model", state=~"{OPEN_STATES}"}}))', "{{model}}", instant=True),),
            kind="stat",
        ),
        Panel(
            "Failed influence analyses",
            "Incidents whose influence analysis failed (solver error, non-finite values, model not loaded). "
            "Failed analyses are retried with backoff up to the configured attempts.",
            "none",
            (Query('max by (model) (poisonwatch_incidents{model=~"$model", state="failed"})', "{{model}}", instant=True),),
            kind="stat",
        ),
        Panel(
            "Influence analyses",
            "Influence analyses finished per second, by model.",
            "ops",
            (Query(rate('sum by (model) (rate(poisonwatch_influence_duration_seconds_count{model=~"$model"}[$rate]))'), "{{model}}"),),
        ),
        Panel(
            "Influence analysis duration (p95)",
            "95th percentile of the wall time of one influence analysis, model loading excluded. "
            "Empty (NaN) while no analysis finished within the rate window.",
            "s",
            (
                Query(
                    rate(
                        "histogram_quantile(0.95, sum by (le, model) "
                        '(rate(poisonwatch_influence_duration_seconds_bucket{model=~"$model"}[$rate])))'
                    ),
                    "{{model}}",
                ),
            ),
        ),
        Panel(
            "Unconverged inverse-HVP solves",
            "Influence solves that stopped before their tolerance; their rankings are unreliable.",
            "none",
            (Query(rate('sum by (model) (increase(poisonwatch_influence_unconverged_solves_total{model=~"$model"}[$rate]))'), "{{model}}"),),
        ),
    ),
)

INCIDENT_TABLE = Section(
    "Incidents",
    (
        Panel(
            "Incidents by model and state",
            "Incidents stored in the database. The links open poisonwatch's incident page for the model and state.",
            "none",
            (Query('max by (model, state) (poisonwatch_incidents{model=~"$model"})', instant=True),),
            kind="table",
            links=(("Open the incidents of this model and state", "${poisonwatch_url}/incidents?model=${__data.fields.model}&state=${__data.fields.state}"),),
        ),
        Panel(
            "Incidents by state",
            "Incidents stored in the database over time, by state.",
            "none",
            (Query('sum by (state) (max by (model, state) (poisonwatch_incidents{model=~"$model"}))', "{{state}}"),),
        ),
        Panel(
            "Incidents opened",
            "Incidents opened in each rate window, by model.",
            "none",
            (Query(rate('sum by (model) (increase(poisonwatch_incidents_opened_total{model=~"$model"}[$rate]))'), "{{model}}"),),
        ),
        Panel(
            "Failed analyses",
            "Incidents in state failed, by model. The link opens the failed incidents with their failure reasons.",
            "none",
            (Query('max by (model) (poisonwatch_incidents{model=~"$model", state="failed"})', instant=True),),
            kind="table",
            links=(("Open the failed incidents of this model", "${poisonwatch_url}/incidents?model=${__data.fields.model}&state=failed"),),
        ),
    ),
)

JOBS = Section(
    "Scheduled jobs",
    (
        Panel(
            "Job runs",
            "Runs of each scheduled job per second.",
            "ops",
            (Query(rate(f"sum by ({JOB_LABEL}) (rate(poisonwatch_job_duration_seconds_count[$rate]))"), f"{{{{{JOB_LABEL}}}}}"),),
        ),
        Panel(
            "Job duration (p95)",
            "95th percentile of the wall time of one run of each job.",
            "s",
            (
                Query(
                    rate(f"histogram_quantile(0.95, sum by (le, {JOB_LABEL}) (rate(poisonwatch_job_duration_seconds_bucket[$rate])))"),
                    f"{{{{{JOB_LABEL}}}}}",
                ),
            ),
        ),
        Panel(
            "Job failures",
            "Job runs that raised an exception, in each rate window.",
            "none",
            (Query(rate(f"sum by ({JOB_LABEL}) (increase(poisonwatch_job_failures_total[$rate]))"), f"{{{{{JOB_LABEL}}}}}"),),
        ),
        Panel(
            "Time since last success",
            "Seconds since each job last succeeded, next to twice its configured interval (the job-overdue alert "
            "adds one minute of slack). The interval series exists only while the scheduler runs.",
            "s",
            (
                Query(f"time() - max by ({JOB_LABEL}) (poisonwatch_job_last_success_timestamp_seconds)", f"{{{{{JOB_LABEL}}}}} since success"),
                Query(f"2 * max by ({JOB_LABEL}) (poisonwatch_job_interval_seconds)", f"{{{{{JOB_LABEL}}}}} two intervals"),
            ),
        ),
    ),
)

INGESTION = Section(
    "Ingestion and API",
    (
        Panel(
            "Predictions ingested",
            "Predictions stored per second, by model; repeats of a stored prediction are not counted.",
            "ops",
            (Query(rate('sum by (model) (rate(poisonwatch_predictions_ingested_total{model=~"$model"}[$rate]))'), "{{model}}"),),
        ),
        Panel(
            "Labels ingested",
            "Ground-truth labels stored per second, by model.",
            "ops",
            (Query(rate('sum by (model) (rate(poisonwatch_labels_ingested_total{model=~"$model"}[$rate]))'), "{{model}}"),),
        ),
        Panel(
            "Rejected write requests",
            "Write requests rejected with a 4xx status per second, by endpoint and reason.",
            "reqps",
            (Query(rate("sum by (endpoint, reason) (rate(poisonwatch_requests_rejected_total[$rate]))"), "{{endpoint}} {{reason}}"),),
        ),
        Panel(
            "API requests by status",
            "HTTP requests per second, by route template and status class.",
            "reqps",
            (Query(rate("sum by (route, status) (rate(poisonwatch_http_request_duration_seconds_count[$rate]))"), "{{route}} {{status}}"),),
        ),
        Panel(
            "API latency (p95)",
            "95th percentile of the HTTP request duration, by route template.",
            "s",
            (
                Query(
                    rate("histogram_quantile(0.95, sum by (le, route) (rate(poisonwatch_http_request_duration_seconds_bucket[$rate])))"),
                    "{{route}}",
                ),
            ),
        ),
    ),
)

PROCESS = Section(
    "Daemon",
    (
        Panel(
            "Daemon up",
            f"1 when Prometheus could scrape the daemon (scrape job {SCRAPE_JOB}), 0 when the scrape failed.",
            "none",
            (Query(f'up{{job="{SCRAPE_JOB}"}}', "{{instance}}", instant=True),),
            kind="stat",
        ),
        Panel(
            "Stored results readable",
            "1 when the last scrape could read incidents and held-out results from the database, else 0.",
            "none",
            (Query("min(poisonwatch_stored_results_up)", "database", instant=True),),
            kind="stat",
        ),
        Panel(
            "Build",
            "poisonwatch version, JAX version, JAX backend and device count of each process. "
            "API-only worker processes report backend none.",
            "none",
            (Query("max by (instance, version, jax_version, backend, devices) (poisonwatch_build_info)", instant=True),),
            kind="table",
        ),
    ),
)


@dataclasses.dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    sections: tuple[Section, ...]


# Drift and training-data audit detectors add their sections to the fleet overview.
DASHBOARDS = (
    Dashboard(
        "poisonwatch-fleet",
        "poisonwatch: fleet overview",
        "Accuracy per model and class, open incidents and influence analyses of every monitored model.",
        (HELDOUT, INCIDENTS),
    ),
    Dashboard(
        "poisonwatch-incidents",
        "poisonwatch: incident triage",
        "Incidents by model and state, with links to poisonwatch's incident pages.",
        (INCIDENT_TABLE,),
    ),
    Dashboard(
        "poisonwatch-daemon",
        "poisonwatch: daemon health",
        "Scheduled jobs, ingestion, API latency and the daemon's own state.",
        (PROCESS, JOBS, INGESTION),
    ),
)


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    targets = []
    for index, query in enumerate(panel.queries):
        target = {"refId": chr(ord("A") + index), "datasource": DATASOURCE, "expr": query.expr, "legendFormat": query.legend}
        if query.instant or panel.kind == "table":
            target |= {"instant": True, "range": False, "format": "table" if panel.kind == "table" else "time_series"}
        targets.append(target)
    defaults: dict = {"unit": panel.unit}
    if panel.max_value is not None:
        defaults |= {"min": 0, "max": panel.max_value}
    if panel.links:
        defaults["links"] = [{"title": title, "url": url, "targetBlank": True} for title, url in panel.links]
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {},
        "targets": targets,
    }


def templating(uses_url: bool) -> dict:
    variables = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {
            "name": "model",
            "label": "Model",
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": "label_values(poisonwatch_incidents, model)", "refId": "model"},
            "definition": "label_values(poisonwatch_incidents, model)",
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".+",
            "current": {"text": "All", "value": "$__all"},
            "hide": 0,
        },
    ]
    if uses_url:
        variables.append(
            {
                "name": "poisonwatch_url",
                "label": "poisonwatch URL",
                "type": "textbox",
                "query": DEFAULT_POISONWATCH_URL,
                "current": {"text": DEFAULT_POISONWATCH_URL, "value": DEFAULT_POISONWATCH_URL},
                "hide": 0,
            }
        )
    return {"list": variables}


def dashboard_json(dashboard: Dashboard) -> dict:
    panels = []
    panel_id = 1
    y = 0
    for section in dashboard.sections:
        panels.append({"id": panel_id, "type": "row", "title": section.title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id += 1
        y += 1
        for index, panel in enumerate(section.panels):
            panels.append(panel_json(panel, panel_id, 12 * (index % 2), y + 8 * (index // 2)))
            panel_id += 1
        y += 8 * ((len(section.panels) + 1) // 2)
    uses_url = any(panel.links for section in dashboard.sections for panel in section.panels)
    links = []
    if uses_url:
        links.append({"title": "poisonwatch incidents", "type": "link", "url": "${poisonwatch_url}/incidents", "targetBlank": True})
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": ["poisonwatch"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "links": links,
        "templating": templating(uses_url),
        "panels": panels,
    }


# --- alert rules ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Alert:
    """One alert: it fires while ``query`` compared with ``threshold`` by ``operator`` holds for ``duration``."""

    name: str
    query: str
    operator: str
    threshold: float
    duration: str
    severity: str
    summary: str
    description: str
    incident_path: str | None = None

    @property
    def expr(self) -> str:
        return f"({self.query}) {self.operator} {self.threshold:g}"


ALERTS = (
    Alert(
        "PoisonwatchIncidentOpen",
        f'sum by (model) (max by (model, state) (poisonwatch_incidents{{state=~"{OPEN_STATES}"}}))',
        ">", 0, "0m", "critical",
        "Model {{ $labels.model }} has {{ $value }} unacknowledged high-confidence misclassification incidents",
        "A labelled prediction was wrong with at least the configured confidence. Review the suspects on the "
        "incident page, then acknowledge or resolve the incident.",
        "/incidents?model={{ $labels.model }}",
    ),
    Alert(
        "PoisonwatchInfluenceAnalysisFailed",
        'max by (model) (poisonwatch_incidents{state="failed"})',
        ">", 0, "0m", "warning",
        "{{ $value }} influence analyses of model {{ $labels.model }} failed",
        "The influence analysis of an incident failed; the incident page shows the reason. "
        "The incident scan retries it with backoff up to the configured number of attempts.",
        "/incidents?model={{ $labels.model }}&state=failed",
    ),
    Alert(
        "PoisonwatchInfluenceUnconverged",
        "sum by (model) (increase(poisonwatch_influence_unconverged_solves_total[1h]))",
        ">", 0, "0m", "warning",
        "An inverse-HVP solve of model {{ $labels.model }} did not converge in the last hour",
        "Conjugate gradient stopped before its tolerance, so the suspect ranking of that incident is unreliable.",
        "/incidents?model={{ $labels.model }}",
    ),
    Alert(
        "PoisonwatchHeldoutAccuracyDrop",
        "max by (model) (max_over_time(poisonwatch_heldout_accuracy_ratio[1d])) "
        "- max by (model) (poisonwatch_heldout_accuracy_ratio)",
        ">", 0.02, "0m", "warning",
        "Held-out accuracy of model {{ $labels.model }} is {{ $value | humanizePercentage }} below its best of the last day",
        "The current version's held-out accuracy fell by more than 2 points against the best value of any version "
        "in the last 24 hours.",
    ),
    Alert(
        "PoisonwatchHeldoutClassAccuracyDrop",
        "max by (model, class) (max_over_time(poisonwatch_heldout_class_accuracy_ratio[1d])) "
        "- max by (model, class) (poisonwatch_heldout_class_accuracy_ratio)",
        ">", 0.1, "0m", "warning",
        "Held-out accuracy of class {{ $labels.class }} of model {{ $labels.model }} is "
        "{{ $value | humanizePercentage }} below its best of the last day",
        "One class's held-out accuracy fell by more than 10 points against the best value in the last 24 hours; "
        "a targeted attack often moves one class only.",
    ),
    Alert(
        "PoisonwatchJobOverdue",
        f"time() - max by ({JOB_LABEL}) (poisonwatch_job_last_success_timestamp_seconds) "
        f"- 2 * max by ({JOB_LABEL}) (poisonwatch_job_interval_seconds)",
        ">", 60, "0m", "warning",
        "Job {{ $labels." + JOB_LABEL + " }} has not succeeded within two intervals",
        "The job's last success is older than twice its configured interval plus one minute "
        "of slack for scrape and evaluation delay.",
    ),
    Alert(
        "PoisonwatchIngestionErrors",
        # The "or 0 * ..." term gives a 0 ratio, not an empty result, before the first failed request.
        f'(sum by (route) (rate({REQUESTS}{{{WRITE_ROUTES}, status!="2xx"}}[10m])) '
        f'or 0 * sum by (route) (rate({REQUESTS}{{{WRITE_ROUTES}}}[10m]))) '
        f'/ sum by (route) (rate({REQUESTS}{{{WRITE_ROUTES}}}[10m]))',
        ">", 0.05, "10m", "warning",
        "{{ $value | humanizePercentage }} of requests to {{ $labels.route }} failed in the last 10 minutes",
        "More than 5% of prediction or label writes were rejected (4xx) or failed (5xx) for 10 minutes.",
    ),
    Alert(
        "PoisonwatchDaemonDown",
        f'min by (instance) (up{{job="{SCRAPE_JOB}"}}) or on () vector(0)',
        "<", 1, "2m", "critical",
        "poisonwatch at {{ $labels.instance }} cannot be scraped",
        f"Prometheus failed to scrape the daemon, or has no target in scrape job {SCRAPE_JOB}. "
        "No other poisonwatch alert can fire while the daemon is down.",
    ),
)

GRAFANA_EVALUATORS = {">": "gt", "<": "lt"}


def annotations(alert: Alert, poisonwatch_url: str, runbook_url: str, *, grafana: bool = False) -> dict:
    summary = alert.summary
    if grafana:
        # Grafana's $value is a description of every query result; the
        # reduced value of the rule's query is $values.B.Value.
        summary = summary.replace("$value", "$values.B.Value")
    values = {
        "summary": summary,
        "description": alert.description,
        "runbook_url": f"{runbook_url}/{alert.name}.md",
    }
    if alert.incident_path is not None:
        values["incident_url"] = poisonwatch_url + alert.incident_path
    return values


def prometheus_rules(poisonwatch_url: str, runbook_url: str) -> dict:
    rules = [
        {
            "alert": alert.name,
            "expr": alert.expr,
            "for": alert.duration,
            "labels": {"severity": alert.severity},
            "annotations": annotations(alert, poisonwatch_url, runbook_url),
        }
        for alert in ALERTS
    ]
    return {"groups": [{"name": "poisonwatch", "rules": rules}]}


def rule_uid(name: str) -> str:
    """Return a Grafana rule uid such as ``poisonwatch-incident-open``: kebab case, at most 40 characters."""
    words = "".join(f"-{char.lower()}" if char.isupper() else char for char in name.removeprefix("Poisonwatch"))
    return f"poisonwatch{words}"[:40]


def grafana_rule(alert: Alert, poisonwatch_url: str, runbook_url: str) -> dict:
    return {
        "uid": rule_uid(alert.name),
        "title": alert.name,
        "condition": "C",
        "data": [
            {
                "refId": "A",
                "relativeTimeRange": {"from": 600, "to": 0},
                "datasourceUid": DATASOURCE_UID,
                "model": {"refId": "A", "expr": alert.query, "instant": True, "range": False},
            },
            {
                "refId": "B",
                "datasourceUid": "__expr__",
                "model": {"refId": "B", "type": "reduce", "expression": "A", "reducer": "last"},
            },
            {
                "refId": "C",
                "datasourceUid": "__expr__",
                "model": {
                    "refId": "C",
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": GRAFANA_EVALUATORS[alert.operator], "params": [alert.threshold]}}],
                },
            },
        ],
        # An empty result means healthy, as in Prometheus; the daemon-down
        # query returns 0 when its target is missing, so it never relies on NoData.
        "noDataState": "OK",
        "execErrState": "Error",
        "for": alert.duration,
        "labels": {"severity": alert.severity},
        "annotations": annotations(alert, poisonwatch_url, runbook_url, grafana=True),
        "isPaused": False,
    }


def grafana_rules(poisonwatch_url: str, runbook_url: str) -> dict:
    rules = [grafana_rule(alert, poisonwatch_url, runbook_url) for alert in ALERTS]
    return {
        "apiVersion": 1,
        "groups": [{"orgId": 1, "name": "poisonwatch", "folder": "poisonwatch", "interval": "1m", "rules": rules}],
    }


# --- output ---------------------------------------------------------------------------


def render(poisonwatch_url: str, runbook_url: str) -> dict[str, str]:
    """Return the content of every generated file, keyed by its path relative to this folder."""
    header = "# Generated by grafana/generate.py; edit that file and rerun it.\n"
    files = {f"dashboards/{dashboard.uid}.json": json.dumps(dashboard_json(dashboard), indent=2) + "\n" for dashboard in DASHBOARDS}
    files["prometheus/rules.yml"] = header + yaml.safe_dump(prometheus_rules(poisonwatch_url, runbook_url), sort_keys=False, width=200)
    files["provisioning/alerting/poisonwatch.yml"] = header + yaml.safe_dump(
        grafana_rules(poisonwatch_url, runbook_url), sort_keys=False, width=200
    )
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing them")
    parser.add_argument("--poisonwatch-url", default=DEFAULT_POISONWATCH_URL, help="base URL of the incident pages in alerts")
    parser.add_argument("--runbook-url", default=DEFAULT_RUNBOOK_URL, help="base URL of the runbook pages in alerts")
    parser.add_argument("--output", type=Path, default=HERE, help="folder to write into (default: this folder)")
    args = parser.parse_args(argv)

    stale = []
    for relative, content in render(args.poisonwatch_url, args.runbook_url).items():
        path = args.output / relative
        if args.check:
            if not path.exists() or path.read_text() != content:
                stale.append(relative)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    if stale:
        print("out of date, rerun python grafana/generate.py: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
