"""JupyterLab widgets: the fused-operator composer (notebook 04) and the plan editor (notebook 05).

The logic lives in workbench.composer and workbench.plan; these classes only lay out controls,
call it, and show what came back. Every control carries stable CSS classes (``wb-...``) that
the browser test addresses. A callback that fails shows one line in the ``wb-status`` label
(the widget stays usable); it never dies silently.
"""

from __future__ import annotations

import dataclasses
import html
import logging
from collections.abc import Callable

import ipywidgets as w

from . import composer as comp
from .errors import WorkbenchError
from .names import symbol

log = logging.getLogger(__name__)

PANE = w.Layout(max_height="420px", overflow="auto", width="100%")


def _classes(widget, *names: str):
    for name in names:
        widget.add_class(name)
    return widget


def _highlight(text: str, lexer: str) -> str:
    """Syntax-highlighted HTML with inline styles (no stylesheet needed, works offline)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import get_lexer_by_name

    return highlight(text, get_lexer_by_name(lexer), HtmlFormatter(noclasses=True, nobackground=True))


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, WorkbenchError) else f"{type(err).__name__}: {text}"


def guarded(status: w.Label, action: Callable) -> Callable:
    """A callback whose failure shows as one line in `status` (a bug is logged with its traceback too)."""

    def run(*args):
        try:
            action(*args)
        except WorkbenchError as err:
            status.value = f"error: {_one_line(err)}"
        except Exception as err:  # noqa: BLE001  (a widget callback has nobody else to raise to)
            log.exception("widget callback failed")
            status.value = f"error: {_one_line(err)}"

    return run


# ---------------------------------------------------------------- knob controls


def knob_control(name: str, choices: list, value) -> w.ValueWidget:
    """A slider over the values worth offering for an integer knob, a dropdown for the others."""
    if all(isinstance(c, int) and not isinstance(c, bool) for c in choices) and len(choices) > 1:
        options = sorted(set(choices) | {value})
        control = w.SelectionSlider(options=options, value=value, description=name, continuous_update=False)
    else:
        options = list(dict.fromkeys(list(choices) + [value]))
        control = w.Dropdown(options=[(str(o), o) for o in options], value=value, description=name)
    return _classes(control, "wb-knob", f"wb-knob-{name}")


# ---------------------------------------------------------------- the composer


class ComposerWidget(w.VBox):
    """Pick a block, compose a variant (impl, fusion toggles, knobs), Apply: program, diff, trace, time, chart."""

    def __init__(self, composer: comp.Composer, block: str | None = None, plan=None):
        super().__init__()
        self.composer, self.plan = composer, plan
        self.result: comp.Result | None = None
        names = list(composer.blocks)
        self.block = _classes(w.Dropdown(options=[(b.title, b.name) for b in composer.blocks.values()],
                                         value=block or names[0], description="block",
                                         layout=w.Layout(width="auto")), "wb-block")
        self.impl = _classes(w.Dropdown(description="impl"), "wb-impl")
        self.fuse_box, self.knob_box = w.HBox(), w.VBox()
        self.apply = _classes(w.Button(description="Apply", button_style="primary"), "wb-apply")
        self.use = _classes(w.Button(description="Use in plan"), "wb-use")
        self.time = _classes(w.Label(value="not measured yet"), "wb-time")
        self.status = _classes(w.Label(value=""), "wb-status")
        self.code = _classes(w.HTML(layout=PANE), "wb-code")
        self.diff = _classes(w.HTML(layout=PANE), "wb-diff")
        self.trace = _classes(w.HTML(layout=PANE), "wb-trace")
        self.chart = _classes(_chart(), "wb-chart")
        self._points: list[list[comp.Result]] = [[], []]
        for index, trace in enumerate(self.chart.data):
            trace.on_click(guarded(self.status, lambda _t, points, _s, i=index: self._clicked(i, points)))
        self.toggles: dict[str, w.ToggleButton] = {}
        self.knobs: dict[str, w.ValueWidget] = {}
        panes = w.HBox([_titled("TensorIR", self.code), _titled("diff against the previous variant", self.diff)])
        self.children = [self.block, self.impl, self.fuse_box, self.knob_box, w.HBox([self.apply, self.use]),
                         self.time, self.status, self.chart, panes, _titled("schedule trace", self.trace)]
        _classes(self, "wb-composer")
        self.block.observe(guarded(self.status, lambda _: self._show_block()), names="value")
        self.impl.observe(guarded(self.status, lambda _: self._show_knobs()), names="value")
        self.apply.on_click(guarded(self.status, lambda _: self.apply_variant()))
        self.use.on_click(guarded(self.status, lambda _: self.use_in_plan()))
        self._show_block()

    # -- what the controls say
    @property
    def current(self) -> comp.Block:
        return self.composer.blocks[self.block.value]

    def variant(self) -> comp.Variant:
        """The variant the controls describe (checked: a bad knob is a KnobError)."""
        toggles = tuple(name for name, toggle in self.toggles.items() if toggle.value)
        knobs = {name: control.value for name, control in self.knobs.items()}
        return self.composer.variant(self.block.value, self.impl.value, toggles, **knobs)

    # -- actions
    def apply_variant(self) -> comp.Result:
        variant = self.variant()
        self.status.value = f"measuring {variant.label} ..."
        self.apply.disabled = True  # clicks while the device works would queue up
        try:
            result = self.composer.try_variant(variant)
        finally:
            self.apply.disabled = False
        recalled = " (recalled: measured before)" if result.cached else ""
        why = f" · {' '.join(result.note.split())}" if result.note and result.status != "ok" else ""
        self.status.value = f"{variant.block}: {result.status}{recalled}{why}"
        self._show_result(result)  # the time label changes last: a browser waiting on it sees everything
        return result

    def use_in_plan(self):
        if self.plan is None:
            raise WorkbenchError("this composer has no plan to put variants in; create it with "
                                 "ComposerWidget(composer, plan=Plan.uniform(model))")
        if self.result is None or not self.result.usable:
            raise WorkbenchError("apply a variant whose numerics hold first; a wrong or failed variant never "
                                 "goes into the plan")
        comp.use_in_plan(self.plan, self.composer.model, self.result.variant)
        variant = self.result.variant
        self.status.value = f"plan: {variant.block} -> tvm:{variant.impl}, {variant.fusion.label}, {variant.knob_text}"
        return self.plan

    # -- showing
    def _show_block(self):
        block = self.current
        impls = comp.applicable_impls(block.conv)
        available = comp.available_toggles(block)
        self.toggles = {name: self._toggle(block, name, name in available) for name in block.toggles}
        self.fuse_box.children = list(self.toggles.values()) or [w.Label("nothing to fuse around this conv")]
        keep = self.impl.value if self.impl.value in impls else impls[0]
        if list(self.impl.options) != impls:
            self.impl.options = impls  # selects the first, which redraws the knobs
        if self.impl.value != keep:
            self.impl.value = keep
        self._show_knobs()
        history = self.composer.history(block.name)
        if history:
            self.load(history[-1].variant)
        self._show_result(history[-1] if history else None)

    def load(self, variant: comp.Variant) -> None:
        """Set the controls to `variant` (block, impl, toggles, knobs); Apply then recalls it from the cache."""
        if self.block.value != variant.block:
            self.block.value = variant.block  # redraws toggles and knobs
        if self.impl.value != variant.impl:
            self.impl.value = variant.impl
        on = set(self.current.toggles_of(variant.fusion))
        for name, toggle in self.toggles.items():
            toggle.value = name in on and not toggle.disabled
        for name, control in self.knobs.items():
            _set_value(control, getattr(variant.knobs, name))

    def _toggle(self, block: comp.Block, name: str, available: bool) -> w.ToggleButton:
        reason = None if available else (comp.supported(block.fusion((name,)), block.conv)
                                          or "the kernels cannot fuse it together with the others")
        toggle = w.ToggleButton(value=available, description=name, disabled=not available,
                                tooltip=reason or f"fuse {name} into the conv")
        return _classes(toggle, "wb-fuse", f"wb-fuse-{name}")

    def _show_knobs(self):
        if not self.impl.value:
            return
        from . import schedules

        layer = self.current.conv
        defaults = schedules.default_knobs(self.impl.value, schedules.ConvLayer.of(layer))
        choices = comp.knob_choices(self.impl.value, layer)
        self.knobs = {f.name: knob_control(f.name, choices[f.name], getattr(defaults, f.name))
                      for f in dataclasses.fields(defaults)}
        tile = self.knobs.get("ow_bn" if self.impl.value == "direct_nchw" else "oc_bn")
        if tile is not None and "vec" in self.knobs:
            tile.observe(guarded(self.status, lambda _: self._vec_follows(tile)), names="value")
        self.knob_box.children = list(self.knobs.values())

    def _vec_follows(self, tile: w.ValueWidget) -> None:
        """The vector lanes must divide the tile they vectorise: a smaller tile takes vec down with it."""
        vec = self.knobs["vec"]
        if tile.value % vec.value:
            lanes = [v for v in vec.options if isinstance(v, int) and tile.value % v == 0 and v <= vec.value]
            vec.value = max(lanes) if lanes else 1

    def _show_result(self, result: comp.Result | None):
        self.result = result
        if result is None:
            self.code.value, self.diff.value, self.trace.value = "", "", ""
        else:
            self.code.value = _highlight(result.tir, "python")
            self.diff.value = _highlight(result.diff, "diff") if result.diff else "<i>first variant on this block</i>"
            self.trace.value = _highlight(result.trace, "python")
        self._plot(self.composer.history(self.block.value))
        self.time.value = result.summary if result else "not measured yet"

    def _clicked(self, trace: int, points) -> None:
        """A click on a point of the chart puts that variant back into the controls."""
        for index in points.point_inds[:1]:
            variant = self._points[trace][index].variant
            self.load(variant)
            self.status.value = f"loaded {variant.label}; press Apply to show it"

    def _plot(self, history: list[comp.Result]):
        timed = [(i + 1, r) for i, r in enumerate(history) if r.median_ms is not None]
        groups = ([p for p in timed if p[1].usable], [p for p in timed if not p[1].usable])
        self._points = [[r for _, r in points] for points in groups]  # what a click on a point recalls
        with self.chart.batch_update():
            for trace, points in zip(self.chart.data, groups):
                trace.x = [i for i, _ in points]
                trace.y = [r.median_ms for _, r in points]
                trace.text = [html.escape(r.variant.label) for _, r in points]
            self.chart.layout.title.text = f"variants tried on {self.block.value}"


def _set_value(control: w.ValueWidget, value) -> None:
    """Set a knob control, offering the value first if it was not among its options."""
    values = [o[1] if isinstance(o, tuple) else o for o in control.options]
    if value not in values:
        control.options = (sorted(values + [value]) if isinstance(control, w.SelectionSlider)
                           else list(control.options) + [(str(value), value)])
    control.value = value


def _titled(title: str, pane: w.Widget) -> w.VBox:
    return w.VBox([w.HTML(f"<b>{html.escape(title)}</b>"), pane], layout=w.Layout(flex="1 1 0", min_width="0"))


def _chart():
    """One FigureWidget for the composer's life, updated in place (plotly 7 needs anywidget for it)."""
    try:
        import plotly.graph_objects as go

        figure = go.FigureWidget()
    except ImportError as err:
        raise WorkbenchError(f"the live chart needs the anywidget package ({err}); install the pinned "
                             "requirements (requirements.lock) and restart the kernel") from None
    hover = "variant %{x}: %{y:.3f} ms<br>%{text}<extra></extra>"
    figure.add_scatter(mode="markers", name="numerics ok", marker={"color": "seagreen", "size": 10}, hovertemplate=hover)
    figure.add_scatter(mode="markers", name="wrong (never wins)", marker={"color": "crimson", "symbol": "x", "size": 10},
                       hovertemplate=hover)
    figure.update_layout(xaxis_title="variant tried", xaxis_dtick=1, yaxis_title="median ms", height=320,
                         margin={"l": 50, "r": 10, "t": 40, "b": 40})
    return figure


# ---------------------------------------------------------------- the plan editor


class PlanEditor(w.VBox):
    """Per conv: the implementation (with its measured time) and the fusions legal there; rebuild, re-time.

    `plan` is the starting plan; `.plan` is the edited one, validated. `runner` (a HybridRunner)
    does what the Rebuild and Re-time buttons ask; without one they say so in the status line.
    """

    def __init__(self, model, plan, records: list[dict] = (), candidates=None, runner=None):
        from .kernels.registry import all_candidates

        super().__init__()
        self.model, self.runner = model, runner
        self.candidates = all_candidates() if candidates is None else candidates
        self.times = _best_times(records)
        self.blocks = {b.name: b for b in comp.blocks(model)}
        self.start = plan  # its knobs, notes and settings carry over into the edited plan
        self.impls: dict[str, w.Dropdown] = {}
        self.toggles: dict[str, dict[str, w.ToggleButton]] = {}
        self.status = _classes(w.Label(value=""), "wb-status")
        rows = [self._row(conv, plan.layers.get(conv.name)) for conv in model.convs]
        self.result = _classes(w.Label(value=""), "wb-plan-result")
        self.rebuild_button = _classes(w.Button(description="Rebuild", button_style="primary"), "wb-rebuild")
        self.retime_button = _classes(w.Button(description="Re-time"), "wb-retime")
        self.rebuild_button.on_click(guarded(self.status, lambda _: self.rebuild()))
        self.retime_button.on_click(guarded(self.status, lambda _: self.retime()))
        self.children = rows + [w.HBox([self.rebuild_button, self.retime_button]), self.result, self.status]
        _classes(self, "wb-plan-editor")

    # -- rows
    def _row(self, conv, entry) -> w.HBox:
        options = self._options(conv)
        impl = entry.impl if entry else options[0][1]
        if impl not in [value for _, value in options]:
            options.append((impl, impl))
        dropdown = _classes(w.Dropdown(options=options, value=impl, layout=w.Layout(width="340px")),
                            "wb-plan-impl", f"wb-plan-impl-{symbol(conv.name)}")
        self.impls[conv.name] = dropdown
        block = self.blocks[conv.name]
        on = set(block.toggles_of(self._fusion(entry))) if entry else set()
        self.toggles[conv.name] = {name: _classes(w.ToggleButton(value=name in on, description=name),
                                                  "wb-fuse", f"wb-fuse-{name}") for name in block.toggles}
        dropdown.observe(guarded(self.status, lambda _, name=conv.name: self._legal(name)), names="value")
        self._legal(conv.name)
        label = _classes(w.Label(f"{conv.name} ({conv.geometry.describe()})", layout=w.Layout(width="300px")),
                         "wb-plan-layer")
        return w.HBox([label, dropdown, *self.toggles[conv.name].values()])

    def _options(self, conv) -> list[tuple[str, str]]:
        """The implementations that apply here, measured ones first and fastest first."""
        applies = [c.impl for c in self.candidates if not c.alias_of and c.why_not_applicable(conv) is None]
        timed = sorted((i for i in applies if (conv.name, i) in self.times), key=lambda i: self.times[(conv.name, i)])
        untimed = [i for i in applies if (conv.name, i) not in self.times]
        return ([(f"{i} · {self.times[(conv.name, i)]:.3f} ms", i) for i in timed]
                + [(f"{i} · not measured", i) for i in untimed])

    def _fusion(self, entry):
        from .fusion import Fusion, fused_layers, prologue_layers

        conv = self.model.layer(entry.layer)
        return Fusion.of(tuple(prologue_layers(self.model, conv, tuple(entry.prologue))),
                         tuple(fused_layers(self.model, conv, tuple(entry.fuse))))

    def _legal(self, name: str):
        """Enable the toggles the chosen implementation can compute here; switch the others off."""
        for toggle_name, toggle in self.toggles[name].items():
            reason = self._why_not(name, self.impls[name].value, toggle_name)
            toggle.disabled, toggle.tooltip = reason is not None, reason or f"fuse {toggle_name}"
            if reason:
                toggle.value = False

    def _why_not(self, name: str, impl: str, toggle_name: str) -> str | None:
        from .fusion import legal_fusions, prologue_chain
        from .kernels.registry import find

        ops, block = self.blocks[name].toggles[toggle_name], self.blocks[name]
        candidate = find(impl, self.candidates)
        if ops == block.prologue:
            if prologue_chain(self.model, block.conv, candidate.prologue_fusible) != ops:
                return f"{impl} cannot compute {toggle_name} in its input stage"
            return None
        if ops not in legal_fusions(self.model, block.conv, candidate.fusible):
            return f"{impl} cannot fuse {toggle_name} here"
        return None

    # -- the edited plan
    def set(self, layer: str, impl: str, toggles: tuple[str, ...] | None = None) -> None:
        """What picking `impl` (and `toggles`, default: every legal one) in the layer's row does."""
        if layer not in self.impls:
            raise WorkbenchError(f"{layer!r} is not a conv of {self.model.name!r}; convs: {', '.join(self.impls)}")
        values = [value for _, value in self.impls[layer].options]
        if impl not in values:
            raise WorkbenchError(f"{impl!r} does not apply to {layer!r}; options: {values}")
        self.impls[layer].value = impl
        for name, toggle in self.toggles[layer].items():
            toggle.value = not toggle.disabled and (toggles is None or name in toggles)

    @property
    def plan(self):
        """The plan the controls describe, validated (PlanError names what does not fit).

        A conv keeps its starting entry's knobs while its implementation is unchanged.
        """
        from .plan import LayerPlan

        entries = {}
        for conv in self.model.convs:
            block, on = self.blocks[conv.name], [n for n, t in self.toggles[conv.name].items() if t.value]
            chosen, impl = {block.toggles[n] for n in on}, self.impls[conv.name].value
            start = self.start.layers.get(conv.name)
            knobs = dict(start.knobs) if start is not None and start.impl == impl else {}
            entries[conv.name] = LayerPlan(conv.name, impl, block.epilogue if block.epilogue in chosen else (),
                                           block.prologue if block.prologue in chosen else (), knobs)
        plan = dataclasses.replace(self.start, layers=entries, notes=list(self.start.notes))
        plan.validate(self.model, self.candidates)
        return plan

    def plan_with(self, layer: str, impl: str, toggles: tuple[str, ...] | None = None):
        """The edited plan with one more change, leaving the controls as they are."""
        before = (self.impls[layer].value, {n: t.value for n, t in self.toggles[layer].items()})
        try:
            self.set(layer, impl, toggles)
            return self.plan
        finally:
            self.impls[layer].value = before[0]
            for name, value in before[1].items():
                self.toggles[layer][name].value = value

    # -- buttons
    def rebuild(self) -> str:
        self._need_runner("rebuild")
        plan = self.plan
        self.status.value = "building the hybrid from the edited plan ..."
        self.result.value = self.runner.rebuild(plan)
        self.status.value = "rebuilt"
        return self.result.value

    def retime(self) -> str:
        self._need_runner("re-time")
        self.status.value = "timing the hybrid on the device ..."
        self.result.value = self.runner.retime()
        self.status.value = "re-timed"
        return self.result.value

    def _need_runner(self, what: str):
        if self.runner is None:
            raise WorkbenchError(f"nothing to {what} with: give the editor a runner "
                                 "(PlanEditor(..., runner=HybridRunner(model, device, work, config, threads, x)))")


def _best_times(records) -> dict[tuple[str, str], float]:
    """(layer, impl) -> fastest usable median ms among the records of the conv alone (not a fused block)."""
    from .measure import usable

    best = {}
    for rec in usable([r for r in records if not r.get("fusion")]):
        key = (rec["layer"], rec["impl"])
        best[key] = min(best.get(key, float("inf")), rec["median_ms"])
    return best


class HybridRunner:
    """What the plan editor's buttons do: build the hybrid from a plan, and time it on the device."""

    def __init__(self, model, device, work, config, threads: int, x, executable=None):
        self.model, self.device, self.work, self.config, self.threads, self.x = model, device, work, config, threads, x
        self.executable = executable

    def rebuild(self, plan) -> str:
        from .study import build_models

        self.executable = build_models(self.model, {"hybrid": plan}, self.work, self.device.target)["hybrid"]
        return self.retime()

    def retime(self) -> str:
        from . import hybrid

        if self.executable is None:
            raise WorkbenchError("no hybrid built yet: press Rebuild first")
        run = hybrid.run_remote(self.device, self.executable, self.x, reference=self.model,
                                timing=self.config.end_to_end_timing, threads=self.threads)
        mark = "✓ numerics ok" if run["numerics_ok"] else f"✗ wrong (max abs err {run['max_abs_err']:.2g})"
        return f"hybrid over RPC: {run['median_ms']:.2f} ms {mark}"
