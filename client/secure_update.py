"""A site's side of secure aggregation: check, clip and weight its own update, then mask it.

With ``federation.secure_aggregation`` the server sees masked vectors only, so it can no longer
screen single updates; each site screens its own before Flower's ``secaggplus_mod`` masks it:

1. the round's global weights arrive in Flower's legacy fit format (an ordered list of arrays);
   they are named with the site's own architecture (a count or shape that differs is an error);
2. the site trains as in a plain round (the ordinary train handler, unchanged);
3. its local weights must have the global model's keys, shapes and dtypes and be finite, else
   the site *refuses* its update: it takes part in the protocol with weight 0 and a zero update,
   and says why (the server logs it as a rejected update);
4. the update (local minus global weights, in float64) is clipped to the L2 bound
   ``update-clip-norm`` the server announces in the round config, then each weight to
   ``[-quantization-clip, quantization-clip]`` (Flower's quantisation range, so nothing is cut
   silently inside the protocol);
5. the weight it claims (its number of training examples) is cut to ``max-weight``; the
   protocol multiplies the update by ``weight / max-weight`` and the server divides the unmasked
   sum by the total weight.

A site that declines the round (its privacy budget) also takes part with weight 0. What leaves
the site in the clear: its metrics (loss, examples, time), its privacy record, and the
``secure-update`` record (``status``, ``reason``, ``clipped``, ``weight``, ``claimed``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from medsegdiff_core.model import MedSegDiffUNet
from medsegdiff_core.model.presets import UNetSpec
from medsegdiff_core.records import NUM_EXAMPLES, PrivacyRecord, RecordError

from .site import Site

Handler = Callable[[Message, Context], Message]

SECURE_RECORD = "secure-update"  # the reply's ConfigRecord: what the site did with its update
CLIP_NORM = "update-clip-norm"  # round config keys the server announces
QUANTIZATION_CLIP = "quantization-clip"
MAX_WEIGHT = "max-weight"


def secure_aggregation_mod(msg: Message, context: Context, call_next: Handler) -> Message:
    """The train mod of the ClientApp: SecAgg+ for train messages of the protocol, the plain
    handler for every other message (a run without secure aggregation is unchanged)."""
    if (
        msg.metadata.message_type != MessageType.TRAIN
        or RECORD_KEY_CONFIGS not in msg.content.config_records
    ):
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda m, c: secure_update(m, c, call_next))


Layout = tuple[tuple[str, tuple[int, ...], str], ...]


@lru_cache(maxsize=4)
def _layout(spec: UNetSpec) -> Layout:
    model = MedSegDiffUNet(spec)
    return tuple((k, tuple(v.shape), str(v.numpy().dtype)) for k, v in model.state_dict().items())


def reference_layout(site: Site) -> Layout:
    """(key, shape, dtype) of every weight of the site's architecture, in state-dict order."""
    return _layout(site.config.unet_spec())


def named_global(arrays: list[np.ndarray], layout: Layout) -> dict[str, np.ndarray]:
    """The server's ordered arrays named with the site's architecture (ValueError if they do
    not fit it)."""
    if len(arrays) != len(layout):
        raise ValueError(
            f"the server sent {len(arrays)} arrays; this site's model has {len(layout)}"
        )
    named = {}
    for array, (key, shape, dtype) in zip(arrays, layout, strict=True):
        if tuple(array.shape) != shape or str(array.dtype) != dtype:
            raise ValueError(
                f"the server's {key} is {array.dtype}{list(array.shape)}, not {dtype}{list(shape)}"
            )
        named[key] = array
    return named


def update_problem(local: ArrayRecord, reference: dict[str, np.ndarray]) -> str | None:
    """Why the site's own weights may not be sent (None: keys, shapes, dtypes right, finite)."""
    missing, extra = reference.keys() - local.keys(), local.keys() - reference.keys()
    if missing or extra:
        return f"keys differ from the global model (missing {sorted(missing)[:3]}, " + (
            f"unexpected {sorted(extra)[:3]})"
        )
    for key, expected in reference.items():
        value = local[key].numpy()
        if tuple(value.shape) != expected.shape:
            return f"{key}: shape {tuple(value.shape)} != {expected.shape}"
        if value.dtype != expected.dtype:
            return f"{key}: dtype {value.dtype} != {expected.dtype}"
        if not np.isfinite(value).all():
            return f"{key}: contains NaN or Inf"
    return None


def clipped_update(
    local: ArrayRecord, reference: dict[str, np.ndarray], clip_norm: float, coord_clip: float
) -> tuple[list[np.ndarray], bool]:
    """local - global per weight (float64; zero for integer buffers), clipped to L2 norm
    ``clip_norm`` and then to ``[-coord_clip, coord_clip]`` per weight; and whether either
    clip changed it."""
    update = []
    for key, base in reference.items():
        if np.issubdtype(base.dtype, np.floating):
            update.append(local[key].numpy().astype(np.float64) - base.astype(np.float64))
        else:
            update.append(np.zeros(base.shape, dtype=np.float64))
    norm = math.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u in update))
    clipped = False
    if norm > clip_norm:
        update = [u * (clip_norm / norm) for u in update]
        clipped = True
    if any(u.size and float(np.abs(u).max()) > coord_clip for u in update):
        update = [np.clip(u, -coord_clip, coord_clip) for u in update]
        clipped = True
    return update, clipped


def _privacy(reply: Message) -> PrivacyRecord | None:
    if "privacy" not in reply.content.config_records:
        return None
    try:
        return PrivacyRecord.from_config(reply.content["privacy"])
    except RecordError:
        return None


def secure_update(msg: Message, context: Context, call_next: Handler) -> Message:
    """Run the site's plain train handler on the legacy fit message of the protocol and answer
    with its checked, clipped and weighted update (see the module docstring)."""
    site = Site.from_context(context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    reference = named_global(parameters_to_ndarrays(fitins.parameters), reference_layout(site))
    inner = Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in reference.items()}),
                "config": ConfigRecord(config),
            }
        ),
        metadata=copy.deepcopy(msg.metadata),
    )
    reply = call_next(inner, context)
    if reply.has_error():
        raise RuntimeError(f"{site.name}: training failed: {reply.error.reason}")
    content = reply.content
    claimed = int(content["metrics"].get(NUM_EXAMPLES, 0))
    max_weight = int(config[MAX_WEIGHT])
    privacy = _privacy(reply)
    status, reason, clipped, weight = "ok", "", False, min(claimed, max_weight)
    update = [np.zeros(a.shape, dtype=np.float64) for a in reference.values()]
    if privacy is not None and privacy.declined:
        status, reason, weight = "declined", privacy.reason or "", 0
    elif "arrays" not in content.array_records:
        status, reason, weight = "refused", "the site's training sent no weights", 0
    elif (problem := update_problem(content["arrays"], reference)) is not None:
        status, reason, weight = "refused", problem, 0
    else:
        update, clipped = clipped_update(
            content["arrays"], reference, float(config[CLIP_NORM]), float(config[QUANTIZATION_CLIP])
        )
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters(update),
        num_examples=weight,
        metrics={},
    )
    out = compat.fitres_to_recorddict(fitres, keep_input=False)
    metrics = dict(content["metrics"]) | {NUM_EXAMPLES: weight}
    out["metrics"] = MetricRecord(metrics)
    for name in ("site", "privacy"):
        if name in content.config_records:
            out[name] = content[name]
    out[SECURE_RECORD] = ConfigRecord(
        {
            "status": status,
            "reason": reason,
            "clipped": clipped,
            "weight": weight,
            "claimed": claimed,
        }
    )
    # Flower quantises the update with stochastic rounding drawn from NumPy's global generator,
    # right after this returns. Seeded per (run seed, round, site), a re-run round after a crash
    # quantises as the first attempt did; the rounding is not what keeps the update secret (the
    # pairwise masks, from a cryptographic generator, are).
    np.random.seed(site.seed(int(config["server-round"]), "quantization") % 2**32)
    return Message(content=out, reply_to=msg)
