"""Launch form: model, a chat prompt or a file of prompts, sampling, priority, activation budget, private.

Enter in any field or ctrl+s submits; a mistake shows as one red line under the form and keeps
what was typed. The form's values are checked by ``build_spec``, a pure function, so the rules
are tested without a terminal and match ``kluster generate``'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Input, Label, RadioButton, RadioSet, Select, Static

from dev_tui.localjobs import LaunchSpec
from engine.errors import ConfigError

#: a batch file larger than this is refused (it is read on the UI thread, and is meant for prompts)
MAX_BATCH_BYTES = 1 << 20
MAX_BATCH_PROMPTS = 100


@dataclass(frozen=True)
class FormValues:
    """The launch form as typed (strings), before checking."""

    model: str
    batch: bool
    prompt: str
    file: str
    max_new_tokens: str = "64"
    temperature: str = "0"
    top_p: str = "1"
    seed: str = "0"
    priority: str = "5"
    activation: str = "1"
    spot_check: str = "0"
    private: bool = False
    wait_for_route: bool = False


def read_prompts(path: Path) -> tuple[str, ...]:
    """Prompts from a file: one per line (blank lines and ``#`` comments skipped); ``.jsonl``: {"prompt": ...}."""
    try:
        if path.stat().st_size > MAX_BATCH_BYTES:
            raise ConfigError(f"{path} is larger than {MAX_BATCH_BYTES >> 20} MiB")
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except ValueError:
                raise ConfigError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ConfigError(f'{path}:{number}: expected {{"prompt": "..."}}')
            line = item["prompt"]
        prompts.append(line)
    if not prompts:
        raise ConfigError(f"{path} holds no prompts (one per line)")
    if len(prompts) > MAX_BATCH_PROMPTS:
        raise ConfigError(f"{path} holds {len(prompts)} prompts; at most {MAX_BATCH_PROMPTS} per batch")
    return tuple(prompts)


def _number(text: str, name: str, low: float, high: float, *, integer: bool = False) -> float:
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low:g} and {high:g}, got {text}")
    return value


def build_spec(values: FormValues) -> LaunchSpec:
    """Check the form; a mistake raises a one-line ConfigError naming the field."""
    if not values.model:
        raise ConfigError("pick a model (the coordinator serves none, or is not reachable yet)")
    if values.batch:
        if not values.file.strip():
            raise ConfigError("give a file of prompts (one per line)")
        prompts = read_prompts(Path(values.file.strip()).expanduser())
    else:
        if not values.prompt.strip():
            raise ConfigError("type a prompt")
        prompts = (values.prompt,)
    activation = _number(values.activation, "activation", 0.0, 1.0)
    if activation <= 0:
        raise ConfigError("activation must be above 0 (1 runs the whole model)")
    return LaunchSpec(
        model=values.model,
        prompts=prompts,
        chat=True,
        max_new_tokens=int(_number(values.max_new_tokens, "max tokens", 1, 100_000, integer=True)),
        temperature=_number(values.temperature, "temperature", 0.0, 10.0),
        top_p=_number(values.top_p, "top-p", 0.0, 1.0),
        seed=int(_number(values.seed, "seed", 0, 2**63 - 1, integer=True)),
        priority=int(_number(values.priority, "priority", 0, 9, integer=True)),
        activation=activation,
        spot_check=_number(values.spot_check, "spot check", 0.0, 1.0),
        private=values.private,
        wait_for_route=values.wait_for_route,
    )


class LaunchScreen(Screen[LaunchSpec | None]):
    """Returns the checked ``LaunchSpec`` (or None on escape) to the app."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+s", "submit", "Submit", priority=True),
        Binding("escape", "cancel", "Back"),
    ]
    DEFAULT_CSS = """
    LaunchScreen { padding: 0 1; }
    LaunchScreen #launch-title { text-style: bold; height: 1; margin-bottom: 1; }
    LaunchScreen .row { height: auto; margin-bottom: 1; }
    LaunchScreen .label { width: 9; height: 1; color: $text-muted; }
    LaunchScreen .plabel { width: auto; height: 1; color: $text-muted; padding: 0 1 0 0; }
    LaunchScreen Select { width: 40; }
    LaunchScreen #prompt, LaunchScreen #file { width: 1fr; }
    LaunchScreen .num { width: 9; margin-right: 2; }
    LaunchScreen RadioSet { layout: horizontal; width: auto; height: 1; }
    LaunchScreen RadioSet > RadioButton { width: auto; margin-right: 3; }
    LaunchScreen Checkbox { width: auto; margin-right: 3; }
    LaunchScreen #launch-error { color: $error; height: auto; margin-bottom: 1; }
    LaunchScreen #submit { width: auto; }
    """

    def __init__(self, models: list[str], default_model: str | None = None) -> None:
        super().__init__()
        self.models = models
        self.default_model = default_model if default_model in models else (models[0] if models else None)

    def compose(self) -> ComposeResult:
        yield Static("Launch a job", id="launch-title")
        with Vertical():
            with Horizontal(classes="row"):
                yield Label("Model", classes="label")
                if self.models:
                    yield Select(
                        [(m, m) for m in self.models],
                        value=self.default_model or self.models[0],
                        allow_blank=False,
                        compact=True,
                        id="model",
                    )
                else:
                    yield Static(
                        "no models known yet: is the coordinator reachable? (escape, then r retries)", id="model"
                    )
            with Horizontal(classes="row"):
                yield Label("Kind", classes="label")
                with RadioSet(compact=True, id="kind"):
                    yield RadioButton("Chat prompt", value=True, id="kind-chat", compact=True)
                    yield RadioButton("Batch: file of prompts", id="kind-batch", compact=True)
            with Horizontal(classes="row"):
                yield Label("Prompt", classes="label")
                yield Input(placeholder="Ask the model something (Enter submits)", id="prompt", compact=True)
            with Horizontal(classes="row"):
                yield Label("File", classes="label")
                yield Input(
                    placeholder='one prompt per line (.jsonl: {"prompt": ...})', id="file", compact=True, disabled=True
                )
            with Horizontal(classes="row"):
                yield Label("Sampling", classes="label")
                yield from self._number("Tokens", "max_new_tokens", "64", "integer")
                yield from self._number("Temp", "temperature", "0", "number")
                yield from self._number("Top-p", "top_p", "1", "number")
                yield from self._number("Seed", "seed", "0", "integer")
            with Horizontal(classes="row"):
                yield Label("Job", classes="label")
                yield from self._number("Priority", "priority", "5", "integer")
                yield from self._number("Activation", "activation", "1", "number")
                yield from self._number("Spot check", "spot_check", "0", "number")
            with Horizontal(classes="row"):
                yield Label("Options", classes="label")
                yield Checkbox("Private", id="private", compact=True)
                yield Checkbox("Wait for a route (queue while no nodes serve it)", id="wait_for_route", compact=True)
            yield Static("", id="launch-error")
            yield Button("Submit (ctrl+s)", variant="primary", id="submit", compact=True)
        yield Footer()

    def _number(self, label: str, field_id: str, default: str, kind: str) -> ComposeResult:
        yield Label(label, classes="plabel")
        yield Input(default, type=kind, id=field_id, classes="num", compact=True)  # type: ignore[arg-type]

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        batch = event.pressed.id == "kind-batch"
        self.query_one("#file", Input).disabled = not batch
        self.query_one("#prompt", Input).disabled = batch
        self.query_one("#file" if batch else "#prompt", Input).focus()

    def values(self) -> FormValues:
        def text(field_id: str) -> str:
            return self.query_one(f"#{field_id}", Input).value

        model_widget = self.query_one("#model")
        model = (
            str(model_widget.value)
            if isinstance(model_widget, Select) and model_widget.value is not Select.NULL
            else ""
        )
        return FormValues(
            model=model,
            batch=self.query_one("#kind-batch", RadioButton).value,
            prompt=text("prompt"),
            file=text("file"),
            max_new_tokens=text("max_new_tokens"),
            temperature=text("temperature"),
            top_p=text("top_p"),
            seed=text("seed"),
            priority=text("priority"),
            activation=text("activation"),
            spot_check=text("spot_check"),
            private=self.query_one("#private", Checkbox).value,
            wait_for_route=self.query_one("#wait_for_route", Checkbox).value,
        )

    def action_submit(self) -> None:
        try:
            spec = build_spec(self.values())
        except ConfigError as exc:
            self.query_one("#launch-error", Static).update(f"✖ {exc}")
            return
        self.dismiss(spec)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "submit":
            self.action_submit()
