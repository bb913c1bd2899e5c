"""HTML pages for the on-call engineer: the incident list and one incident.

Alerts and dashboards link here. The pages show what the JSON API returns,
rendered on the server with escaped text and no scripts.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

from fastapi import APIRouter, HTTPException
from fastapi.responses import HTMLResponse
from sqlalchemy.orm import Session

from monitor import schemas
from storage import queries
from storage.models import IncidentState

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #1d1d1f; }
table { border-collapse: collapse; margin: 1rem 0; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; }
th { background: #f3f3f3; }
.warn { color: #b00020; font-weight: bold; }
.image td { width: 14px; height: 14px; padding: 0; border: none; }
"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body>{body}</body></html>"
    )


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render rows of already-escaped cells as an HTML table."""
    head = "".join(f"<th>{html.escape(header)}</th>" for header in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(values: Sequence[float], shape: Sequence[int]) -> str:
    """Render a 2-D input with values in [0, 1] as a grid of grey cells; other shapes as ''."""
    if len(shape) != 2:
        return ""
    rows, columns = shape
    cells = []
    for row in range(rows):
        line = ""
        for column in range(columns):
            grey = 255 - int(255 * min(max(values[row * columns + column], 0.0), 1.0))
            line += f'<td style="background: rgb({grey},{grey},{grey})"></td>'
        cells.append(f"<tr>{line}</tr>")
    return f'<table class=image aria-label="input image">{"".join(cells)}</table>'


def incident_list_html(incidents: Sequence[schemas.IncidentSummary], state: str | None) -> str:
    rows = [
        [
            f'<a href="/incidents/{incident.id}">{incident.id}</a>',
            html.escape(incident.model),
            html.escape(incident.model_version),
            html.escape(incident.prediction_id),
            html.escape(incident.state),
            str(incident.true_label),
            str(incident.predicted_class),
            f"{incident.confidence:.3f}",
            html.escape(incident.opened_at),
        ]
        for incident in incidents
    ]
    title = f"incidents ({state})" if state else "incidents"
    headers = ["id", "model", "version", "prediction", "state", "true label", "predicted", "confidence", "opened"]
    return f"<h1>{html.escape(title)}</h1>" + _table(headers, rows)


def incident_detail_html(incident: schemas.IncidentDetail) -> str:
    parts = [
        f"<h1>incident {incident.id}: {html.escape(incident.state)}</h1>",
        f"<p>model {html.escape(incident.model)} version {html.escape(incident.model_version)}, "
        f"prediction {html.escape(incident.prediction_id)}: true label {incident.true_label}, "
        f"predicted {incident.predicted_class} with confidence {incident.confidence:.3f}</p>",
        _image(incident.input, incident.input_shape),
    ]
    solver = incident.solver
    if solver.iterations is not None:
        verdict = "converged" if solver.converged else '<span class=warn>did not converge: ranking unreliable</span>'
        parts.append(
            f"<p>inverse-HVP ({html.escape(solver.method or 'cg')}): {solver.iterations} iterations, relative residual "
            f"{'not checked' if solver.relative_residual is None else format(solver.relative_residual, '.2e')}, "
            f"damping {solver.damping}{solver.captured_note()}: {verdict}</p>"
        )
    if incident.failure_reason:
        parts.append(f"<p class=warn>analysis failed: {html.escape(incident.failure_reason)}</p>")
    if incident.ranking_reliable is False:
        parts.append("<p class=warn>ranking unreliable: do not act on these suspects without a rerun</p>")
    if incident.suspects:
        ranked_by = html.escape(incident.score_kind or "raw")
        parts.append(f"<h2>training examples most responsible (ranked by {ranked_by} score, most negative first)</h2>")
        parts.append(
            _table(
                ["rank", "example id", "score", "rank score", "label", "source", "content hash"],
                [
                    [
                        str(suspect.rank),
                        html.escape(suspect.example_id),
                        f"{suspect.score:.4g}",
                        "" if suspect.rank_score is None else f"{suspect.rank_score:.4g}",
                        str(suspect.label),
                        html.escape(suspect.source),
                        f"<code>{html.escape(suspect.content_hash[:16])}</code>",
                    ]
                    for suspect in incident.suspects
                ],
            )
        )
    if incident.source_influence:
        parts.append("<h2>influence by data source (most harmful first)</h2>")
        parts.append(
            _table(
                ["source", "total", "examples", "most negative"],
                [
                    [html.escape(source.source), f"{source.total:.4g}", str(source.count), f"{source.most_negative:.4g}"]
                    for source in incident.source_influence
                ],
            )
        )
    parts.append('<p><a href="/incidents">all incidents</a></p>')
    return "".join(parts)


def build_router(session_factory: Callable[[], Session]) -> APIRouter:
    # Imported here: monitor.api imports this module to mount the router.
    from monitor.api import incident_detail, incident_summary

    router = APIRouter(include_in_schema=False)

    @router.get("/incidents", response_class=HTMLResponse)
    def incidents_page(state: IncidentState | None = None, model: str | None = None) -> HTMLResponse:
        with session_factory() as session:
            incidents = [
                incident_summary(incident)
                for incident in queries.list_incidents(session, state=state, model=model, limit=500)
            ]
        return _page("poisonwatch incidents", incident_list_html(incidents, state.value if state else None))

    @router.get("/incidents/{incident_id}", response_class=HTMLResponse)
    def incident_page(incident_id: int) -> HTMLResponse:
        with session_factory() as session:
            incident = queries.get_incident(session, incident_id)
            if incident is None:
                raise HTTPException(status_code=404, detail=f"incident {incident_id} not found")
            detail = incident_detail(incident)
        return _page(f"poisonwatch incident {incident_id}", incident_detail_html(detail))

    return router
