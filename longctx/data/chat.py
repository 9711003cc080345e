"""Chat conversations through the model's own chat template, and which tokens the assistant produces.

The template is the Jinja text of model.hf_assets_path: its chat_template.jinja file, else
tokenizer_config.json's `chat_template` (a string, or a list of named templates). It is rendered
the way transformers' `apply_chat_template` renders it (transformers/utils/chat_template_utils.py,
v5): a sandboxed Jinja environment with trim_blocks and lstrip_blocks, `raise_exception`,
`strftime_now` and a `tojson` that does not escape HTML; the variables `messages`, `tools`,
`documents`, `add_generation_prompt`, the special tokens of tokenizer_config.json, and
recipe.chat_template_kwargs. Keys of a message whose value is None are dropped first, as there.

The token ids are the whole rendered text tokenized at once (apply_chat_template(tokenize=True)).
The trained tokens are the assistant's: every token overlapping the text after an
`<|im_start|>assistant\\n` header through its closing `<|im_end|>` (a thinking block and tool calls
included; the header and the newline after `<|im_end|>` not). Spans are found on the rendered
text, never by rendering turns one by one: Qwen3's template renders an earlier turn differently
once later turns exist (it drops the reasoning of turns before the last user message).
"""

import json
import os
import re
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from longctx.base import ConfigError, DataError
from longctx.data.tokenizer import HFTokenizer

ASSISTANT_TURN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)  # group 1: what is trained

# Without a template in the folder: Qwen's plain turns, the format this repo used before templates.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_ROLES = {"system", "user", "assistant"}

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
RENDER_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt")  # what render passes itself
# A conversation every template renders with an assistant turn: the check that a template writes the marker.
PROBE = [{"role": "user", "content": "1 plus 1 ?"}, {"role": "assistant", "content": "2 ."}]
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, read in this order


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def jinja_environment() -> ImmutableSandboxedEnvironment:
    """Chat templates are untrusted code from a model folder: a sandbox, as in transformers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def read_templates(assets_path: str, tokenizer_config: dict) -> tuple[dict[str, str], str]:
    """({name: template}, the file they come from): "default" (and e.g. "tool_use") from the
    folder; ({}, "") when it has none."""
    jinja_path = os.path.join(assets_path, "chat_template.jinja")
    if os.path.isfile(jinja_path):  # transformers lets this file override tokenizer_config.json
        with open(jinja_path, encoding="utf-8") as f:
            return {"default": f.read()}, jinja_path
    template, config_path = tokenizer_config.get("chat_template"), os.path.join(assets_path, "tokenizer_config.json")
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}, config_path
    return ({"default": template}, config_path) if template else ({}, "")


def template_roles(ast: jinja2.nodes.Template) -> set[str] | None:
    """The roles a template compares `.role` / `['role']` with; None if it compares none (then it
    renders any role). Qwen's templates skip a message of any other role without a word."""
    def is_role(node):
        return (isinstance(node, jinja2.nodes.Getattr) and node.attr == "role") or (
            isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "role")

    def strings(node):  # 'user', ['user', 'system'] (a list of constants may be folded into one Const)
        if isinstance(node, (jinja2.nodes.List, jinja2.nodes.Tuple)):
            return {s for item in node.items for s in strings(item)}
        value = node.value if isinstance(node, jinja2.nodes.Const) else None
        values = value if isinstance(value, (list, tuple)) else [value]
        return {v for v in values if isinstance(v, str)}

    roles = set()
    for compare in ast.find_all(jinja2.nodes.Compare):
        sides = [compare.expr] + [operand.expr for operand in compare.ops]
        if any(is_role(side) for side in sides):
            roles |= {s for side in sides for s in strings(side)}
    return roles or None


class ChatTemplate:
    """Renders conversations with the model folder's chat template (or Qwen's plain turns when it
    has none, saying so once) and tokenizes them with its tokenizer."""

    def __init__(self, tokenizer: HFTokenizer, assets_path: str, template_kwargs: dict):
        self.tokenizer = tokenizer
        taken = sorted(set(template_kwargs) & set(RENDER_VARIABLES))
        if taken:  # blamed on the key once, rather than on every record the template then fails
            raise ConfigError(f"recipe.chat_template_kwargs sets {taken[0]!r}, which the recipe passes to the template "
                              f"itself ({', '.join(RENDER_VARIABLES)}); remove it")
        sources, self.source = read_templates(assets_path, tokenizer.config)
        self.from_folder = bool(sources)
        env = jinja_environment()
        self.templates, self.roles = {}, {}
        for name, source in (sources or {"default": CHATML_TEMPLATE}).items():
            try:
                ast = env.parse(source)
            except jinja2.TemplateSyntaxError as e:
                raise DataError(f"the chat template {name!r} of {assets_path!r} does not parse: {e.message} (line {e.lineno})") from None
            self.templates[name] = env.from_string(ast)
            self.roles[name] = template_roles(ast) if sources else CHATML_ROLES
        if "default" not in self.templates:
            raise DataError(f"the chat templates of {assets_path!r} are {sorted(self.templates)}; name one of them 'default'")
        special = {name: tokenizer.config.get(name) for name in SPECIAL_TOKEN_NAMES}
        special = {name: t["content"] if isinstance(t, dict) else t for name, t in special.items() if t is not None}
        self.variables = {**special, **template_kwargs}  # kwargs override special tokens, as in transformers
        self._check_marker()

    def _check_marker(self) -> None:
        """Trained tokens are found by Qwen's assistant turn, `<|im_start|>assistant\\n ... <|im_end|>`:
        a template that never renders one would refuse every record, each blamed on its own line.
        A template that cannot render the probe is left to the records (they may have what it needs)."""
        for name, template in self.templates.items():
            try:
                text = template.render(messages=PROBE, tools=None, documents=None, add_generation_prompt=False, **self.variables)
            except Exception:
                continue
            if not ASSISTANT_TURN.search(text):
                raise DataError(f"the chat template {name!r} of {self.source} renders no assistant turn as "
                                "'<|im_start|>assistant\\n ... <|im_end|>', the span the recipe trains (Qwen's chat format); "
                                "use a Qwen model's own template")

    def render(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False) -> str:
        check_roles(messages)
        # transformers' choice among named templates
        name = "tool_use" if tools is not None and "tool_use" in self.templates else "default"
        known = self.roles[name]
        unknown = sorted({m["role"] for m in messages} - known) if known else []
        if unknown:
            raise DataError(f"role {unknown[0]!r} is not one the chat template renders ({', '.join(sorted(known))})")
        messages = [alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        try:
            return self.templates[name].render(messages=messages, tools=tools, documents=None,
                                               add_generation_prompt=add_generation_prompt, **self.variables)
        except Exception as e:  # a template is arbitrary code: any error is the record's, told in one line
            raise DataError(f"the chat template failed: {type(e).__name__}: {' '.join(str(e).split())[:200]}") from None

    def encode(self, messages: list[dict], tools: list | None = None) -> tuple[list[int], list[bool]]:
        """(token ids of the rendered conversation, whether each is an assistant token to train)."""
        check_conversation(messages, tools)
        text = self.render(messages, tools)
        spans = [m.span(1) for m in ASSISTANT_TURN.finditer(text)]
        if not spans:
            raise DataError("the conversation has no assistant turn to learn (none rendered as <|im_start|>assistant)")
        encoding = self.tokenizer.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, overlapping(encoding.offsets, spans)

    def prompt_and_response(self, prompt: str, response: str) -> tuple[str, str]:
        """A rollout's text as the model saw and wrote it: the prompt as the user turn with the
        generation prompt, and the rest of the rendered assistant turn through its <|im_end|>."""
        prompt_text = self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        full = self.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        spans = [m.end(1) for m in ASSISTANT_TURN.finditer(full)]
        if not full.startswith(prompt_text) or not spans or spans[-1] <= len(prompt_text):
            raise DataError("the chat template renders the prompt differently once the response follows; give prompt_ids and response_ids")
        return prompt_text, full[len(prompt_text) : spans[-1]]


def check_roles(messages) -> None:
    """The shape every template reads: a list of objects, each with a string role."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        raise DataError("messages must be a list of {\"role\": str, ...} objects")


def check_conversation(messages, tools) -> None:
    """What a template renders without a word but that would train nonsense: an assistant reply
    that is not a string (Qwen's templates render a list or a missing content as nothing), tools
    or tool-call arguments in a shape the template prints as garbage, a reply to no user turn."""
    check_roles(messages)
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise DataError(f"tools is {_shown(tools)}; give a list of objects (function schemas)")
    users = 0
    for number, message in enumerate(messages, 1):
        users += message["role"] == "user"
        if message["role"] != "assistant":
            continue
        if not users:
            raise DataError(f"message {number} is an assistant turn before any user turn; a reply needs a request before it")
        calls, content = message.get("tool_calls"), message.get("content")
        if calls is not None:
            check_tool_calls(calls, number)
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"message {number}: the assistant's content is {_shown(content)}; give a string "
                            "(it may be missing or null only beside tool_calls)")


def check_tool_calls(calls, number: int) -> None:
    """Each call as OpenAI's {"function": {"name", "arguments"}} or the function itself (Qwen's
    templates read either); arguments an object, or a JSON string of one (printed as it is)."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls):
        raise DataError(f"message {number}: tool_calls is {_shown(calls)}; give a list of objects")
    for call in calls:
        function = call.get("function", call)
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                pass
        if not isinstance(name, str) or not isinstance(arguments, dict):
            raise DataError(f"message {number}: the tool call {_shown(call)} needs a string name and arguments that "
                            "are an object or a JSON string of one")


def _shown(value) -> str:
    return "missing" if value is None else f"{value!r:.60} (a {type(value).__name__})"


def alias_reasoning(message: dict) -> dict:
    """transformers v5 passes a message's reasoning as both `reasoning_content` and `thinking`."""
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    return message if reasoning is None else {"thinking": reasoning, **message, "reasoning_content": reasoning}


def overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token (character offsets), whether it overlaps any span; both lists in text order.
    A token that straddles a span's edge counts as inside, as in transformers' assistant masks."""
    inside, s = [], 0
    for start, end in offsets:
        while s < len(spans) and start >= spans[s][1]:
            s += 1
        inside.append(s < len(spans) and end > spans[s][0])
    return inside
