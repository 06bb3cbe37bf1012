"""Load balancing: which instance of a service takes the next request.

Strategies (a service's policy ``balancing``, else ``GATEWAY_BALANCING``): ``round_robin``
(smooth weighted, nginx's order), ``least_in_flight`` (fewest of this worker's requests in
flight per unit of weight, ties broken at random) and ``random`` (weighted). All of them pass
over instances that cannot take traffic (see :func:`choose`). Reads only: no lock, no I/O.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import Instance, Service

def smooth_schedule(weights: list[int], limit: int = 4096) -> tuple[int, ...]:
    """Indices in smooth weighted round-robin order (nginx's algorithm): weights 5,1,1 give
    a a b a c a a, not a a a a a b c. Weights are scaled down if the cycle would be long."""
    total = sum(weights)
    if total > limit:
        weights = [max(1, w * limit // total) for w in weights]
    current = [0] * len(weights)
    order = []
    for _ in range(sum(weights)):
        for i, w in enumerate(weights):
            current[i] += w
        best = max(range(len(weights)), key=current.__getitem__)
        current[best] -= sum(weights)
        order.append(best)
    return tuple(order)


def choose(service: Service, now: float, exclude: frozenset[str] = frozenset()) -> Instance | None:
    """An instance of ``service`` for the next request, ``None`` when none can take it.

    Instances whose lease lapsed, that drain, or that do not pass their active check get
    nothing. Ejected ones (passive health) are passed over too, unless that leaves fewer
    than half of the others: then (the panic threshold) all of them are used rather than
    none. ``exclude`` names instances a retry must avoid.
    """
    instances = service.instances
    checked = service.health_check is not None
    if len(instances) == 1 and not exclude:
        only = instances[0]  # alone, it is used even when ejected: the panic rule
        return only if only.live(now) and (not checked or only.health.check_ok) else None
    live = [i for i in instances if i.live(now) and (not checked or i.health.check_ok)]
    ready = [i for i in live if i.health.ejected_until <= now]
    if 2 * len(ready) < len(live):  # panic: most are ejected; spread over all of them
        ready = live
    if exclude:
        ready = [i for i in ready if i.id not in exclude]
    if not ready:
        return None
    if len(ready) == 1:
        return ready[0]
    if service.strategy == "least_in_flight":
        return min(ready, key=lambda i: ((i.health.in_flight + 1) / i.weight, random.random()))
    if service.strategy == "random":
        return random.choices(ready, weights=[i.weight for i in ready])[0]
    position = next(service._counter)
    if len(ready) == len(instances):
        return instances[service.schedule[position % len(service.schedule)]]
    total = sum(i.weight for i in ready)
    point = position % total
    for instance in ready:
        point -= instance.weight
        if point < 0:
            return instance
    return ready[-1]
