"""Terminal rendering of incidents with rich, for the CLI and the demo."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from rich.console import Console
from rich.table import Table

from monitor import schemas

# Grey levels used to draw a small input image in the terminal, dark to bright.
_SHADES = " .:-=+*#%@"

# Width used when output goes to a file or pipe, where rich would otherwise
# cut tables to 80 columns and truncate example ids and hashes.
_REDIRECTED_WIDTH = 200


def make_console(*, stderr: bool = False) -> Console:
    """Create a console for results, wide enough for whole ids when output is redirected."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=_REDIRECTED_WIDTH)
    return console


def render_image(values: Sequence[float], shape: Sequence[int]) -> str:
    """Draw a 2-D input with values in [0, 1] as text; other shapes render as ''."""
    if len(shape) != 2:
        return ""
    rows, columns = shape
    lines = []
    for row in range(rows):
        line = ""
        for column in range(columns):
            value = min(max(values[row * columns + column], 0.0), 1.0)
            line += _SHADES[int(value * (len(_SHADES) - 1))] * 2
        lines.append(line)
    return "\n".join(lines)


def print_incident_table(incidents: Sequence[schemas.IncidentSummary], console: Console | None = None) -> None:
    console = console or make_console()
    table = Table(title="incidents")
    for column in ("id", "model", "version", "prediction", "state", "true", "predicted", "confidence", "opened"):
        table.add_column(column)
    for incident in incidents:
        table.add_row(
            str(incident.id),
            incident.model,
            incident.model_version,
            incident.prediction_id,
            incident.state,
            str(incident.true_label),
            str(incident.predicted_class),
            f"{incident.confidence:.3f}",
            incident.opened_at,
        )
    console.print(table)


def print_incident(
    incident: schemas.IncidentDetail,
    *,
    planted: Collection[str] = (),
    console: Console | None = None,
) -> None:
    """Print an incident, its input, its solver diagnostics and its suspects.

    Suspects whose example id is in ``planted`` are marked, for drills where
    the poisons are known.
    """
    console = console or make_console()
    console.print(
        f"[bold]incident {incident.id}[/bold]  model {incident.model} version {incident.model_version}  "
        f"prediction {incident.prediction_id}  state [bold]{incident.state}[/bold]"
    )
    console.print(
        f"true label {incident.true_label}, predicted {incident.predicted_class} "
        f"with confidence {incident.confidence:.3f}"
    )
    image = render_image(incident.input, incident.input_shape)
    if image:
        console.print(image, markup=False, highlight=False)
    solver = incident.solver
    if solver.iterations is not None:
        verdict = "converged" if solver.converged else "[red]did NOT converge: ranking unreliable[/red]"
        residual = "not checked" if solver.relative_residual is None else f"{solver.relative_residual:.2e}"
        console.print(
            f"inverse-HVP ({solver.method or 'cg'}): {solver.iterations} iterations, relative residual {residual}, "
            f"damping {solver.damping}{solver.captured_note()}, {verdict}; analysis took {solver.seconds:.2f} s"
        )
    if incident.failure_reason:
        console.print(f"[red]analysis failed:[/red] {incident.failure_reason}")
    if incident.ranking_reliable is False:
        console.print("[red]ranking unreliable: do not act on these suspects without a rerun[/red]")
    if incident.source_influence:
        sources = Table(title="influence by data source (most harmful first)")
        for column in ("source", "total", "examples", "most negative"):
            sources.add_column(column)
        for source in incident.source_influence:
            sources.add_row(source.source, f"{source.total:.4g}", str(source.count), f"{source.most_negative:.4g}")
        console.print(sources)
    if not incident.suspects:
        return
    ranked_by = incident.score_kind or "raw"
    table = Table(title=f"training examples most responsible (ranked by {ranked_by} score, most negative first)")
    for column in ("rank", "example id", "score", "rank score", "label", "source", "content hash"):
        table.add_column(column)
    if planted:
        table.add_column("planted poison")
    for suspect in incident.suspects:
        row = [
            str(suspect.rank),
            suspect.example_id,
            f"{suspect.score:.4g}",
            f"{suspect.rank_score:.4g}" if suspect.rank_score is not None else "",
            str(suspect.label),
            suspect.source,
            suspect.content_hash[:12],
        ]
        if planted:
            row.append("[bold red]yes[/bold red]" if suspect.example_id in planted else "")
        table.add_row(*row)
    console.print(table)
