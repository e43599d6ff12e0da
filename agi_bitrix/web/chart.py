"""Calls per minute by route over the last hour, as the geometry of an inline SVG bar chart.

The server works out every rectangle; the template only writes them out, so the page needs no
script and no chart library.
"""

from __future__ import annotations

from dataclasses import dataclass

# Stacked bottom to top in this order; a route not listed (none today) is drawn last, in grey.
ROUTES = ("extension", "mobile", "queue")
COLOURS = {"extension": "#2f6fb0", "mobile": "#d9822b", "queue": "#5b9a3c"}
OTHER_COLOUR = "#888888"
WIDTH, HEIGHT = 720, 160  # the plot area, in SVG units
LEFT, BOTTOM, TOP = 36, 20, 8  # room for the axis labels


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str  # shown when the pointer rests on the bar


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    left: int
    top: int
    plot_height: int
    peak: int  # calls in the busiest minute: the top of the scale
    total: int
    bars: list[Bar]
    legend: list[tuple[str, str, int]]  # (route, colour, calls in the hour)


def calls_per_minute(per_minute: list[dict[str, int]]) -> Chart:
    """`per_minute`: calls by route for each minute, oldest first, the last one being now."""
    minutes = len(per_minute)
    peak = max((sum(counts.values()) for counts in per_minute), default=0)
    slot = WIDTH / max(minutes, 1)
    scale = HEIGHT / peak if peak else 0.0
    totals: dict[str, int] = {}
    bars = []
    for index, counts in enumerate(per_minute):
        ago = minutes - 1 - index
        base: float = TOP + HEIGHT
        order = [r for r in ROUTES if r in counts] + sorted(r for r in counts if r not in ROUTES)
        for route in order:
            count = counts[route]
            totals[route] = totals.get(route, 0) + count
            height = count * scale
            base -= height
            when = "this minute" if ago == 0 else f"{ago} min ago"
            bars.append(Bar(round(LEFT + index * slot + 1, 1), round(base, 1), round(slot - 2, 1),
                            round(height, 1), COLOURS.get(route, OTHER_COLOUR), f"{when}: {count} {route}"))
    legend = [(route, COLOURS.get(route, OTHER_COLOUR), totals.get(route, 0))
              for route in [*ROUTES, *sorted(r for r in totals if r not in ROUTES)]]
    return Chart(LEFT + WIDTH, TOP + HEIGHT + BOTTOM, LEFT, TOP, HEIGHT, peak, sum(totals.values()), bars, legend)
