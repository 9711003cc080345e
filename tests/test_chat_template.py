"""Chat records through the model's own chat template (data/chat.py), against transformers.

- Rendering and token ids equal `apply_chat_template` token for token, for a Qwen3-like template
  (the debug tokenizer's: thinking blocks, reasoning dropped before the last query, tool calls, tool
  responses, enable_thinking) and a Qwen2.5-like one written here (a default system prompt).
- The trained tokens are exactly the assistant's: after each `<|im_start|>assistant\\n` through its
  `<|im_end|>`; labels are the next token where that token is trained.
- scripts/show_sft.py writes what the recipe trains; policy prompt/response text is rendered the
  way a sampler sees it; refusals name the file and line; truncation is counted.
"""

import json
import os
import shutil

import pytest

from longctx.base import IGNORE_INDEX, ConfigError, DataError
from longctx.config import parse_config
from longctx.data.chat import ChatTemplate
from longctx.data.loader import RowLength
from longctx.data.tokenizer import HFTokenizer
from longctx.recipes import build_recipe
from scripts import show_sft
from tests.conftest import ROOT

DEBUG_ASSETS = os.path.join(ROOT, "assets", "debug")

# Qwen2.5's behaviour in a template of our own: a default system prompt when none is given, tool
# results as user turns of <tool_response>, and a refusal (raise_exception) of a misplaced system turn.
QWEN25_LIKE = """\
{%- if messages[0].role != 'system' -%}
  {{- '<|im_start|>system\\nYou are a helpful assistant .<|im_end|>\\n' -}}
{%- endif -%}
{%- for m in messages -%}
  {%- if m.role == 'system' and not loop.first -%}
    {{- raise_exception('a system message must come first') -}}
  {%- elif m.role == 'tool' -%}
    {{- '<|im_start|>user\\n<tool_response>\\n' + m.content + '\\n</tool_response><|im_end|>\\n' -}}
  {%- elif m.role in ['system', 'user', 'assistant'] -%}
    {{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}
"""

TOOLS = [{"type": "function", "function": {"name": "add", "description": "a plus b",
                                            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
PLAIN = [{"role": "system", "content": "answer in one short sentence ."},
         {"role": "user", "content": "what is 15 plus 14 ?"},
         {"role": "assistant", "content": "15 plus 14 is 29 ."},
         {"role": "user", "content": "count from 3 to 5 ."},
         {"role": "assistant", "content": "count : 3 4 5 ."}]
THINKING = [{"role": "user", "content": "what is 2 plus 3 ?"},
            {"role": "assistant", "content": "5 .", "reasoning_content": "2 plus 3 is 5 ."},  # dropped: before the last query
            {"role": "user", "content": "and 4 plus 4 ?"},
            {"role": "assistant", "content": "8 .", "reasoning_content": "4 plus 4 is 8 ."}]
TOOL_CALLS = [{"role": "user", "content": "what is 4 plus 4 ?"},
              {"role": "assistant", "content": None, "reasoning_content": "use the tool .",
               "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 4, "b": 4}}},
                              {"type": "function", "function": {"name": "add", "arguments": "{\"a\": 0}"}}]},
              {"role": "tool", "content": "8"}, {"role": "tool", "content": "0"},
              {"role": "assistant", "content": "<think>\nit is 8 .\n</think>\n\n8 ."}]  # reasoning inside content
# What the assistant writes in each, as the Qwen3-like template renders it.
TRAINED = {
    "plain": "15 plus 14 is 29 .<|im_end|><think>\n\n</think>\n\ncount : 3 4 5 .<|im_end|>",
    "thinking": "5 .<|im_end|><think>\n4 plus 4 is 8 .\n</think>\n\n8 .<|im_end|>",
    "tools": ('<think>\nuse the tool .\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 4, "b": 4}}\n</tool_call>\n'
              '<tool_call>\n{"name": "add", "arguments": {"a": 0}}\n</tool_call><|im_end|><think>\nit is 8 .\n</think>\n\n8 .<|im_end|>'),
}
CONVERSATIONS = {"plain": (PLAIN, None), "thinking": (THINKING, None), "tools": (TOOL_CALLS, TOOLS)}


def assets_with(tmp_path, name: str, template=None, jinja: str | None = None) -> str:
    """A copy of the debug tokenizer folder with `template` in tokenizer_config.json (a string or
    the list of named templates) and/or a chat_template.jinja file; neither: no template."""
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(os.path.join(DEBUG_ASSETS, "tokenizer.json"), folder)
    config = json.load(open(os.path.join(DEBUG_ASSETS, "tokenizer_config.json")))
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return str(folder)


def hf_tokenizer(template: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(DEBUG_ASSETS, "tokenizer.json"), eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=template)


def debug_template() -> str:
    return json.load(open(os.path.join(DEBUG_ASSETS, "tokenizer_config.json")))["chat_template"]


@pytest.fixture(scope="module")
def qwen25_assets(tmp_path_factory):
    """The Qwen2.5-like template in chat_template.jinja, which overrides tokenizer_config.json's (as in transformers)."""
    return assets_with(tmp_path_factory.mktemp("qwen25"), "assets", template="{{ raise_exception('not me') }}", jinja=QWEN25_LIKE)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
@pytest.mark.parametrize("case", ["plain", "thinking", "tools"])
@pytest.mark.parametrize("flavor", ["qwen3", "qwen2.5"])
def test_rendering_and_ids_match_transformers(flavor, case, kwargs, qwen25_assets):
    template, assets = (debug_template(), DEBUG_ASSETS) if flavor == "qwen3" else (QWEN25_LIKE, qwen25_assets)
    messages, tools = CONVERSATIONS[case]
    if flavor == "qwen2.5":  # its template reads no tool calls or reasoning
        messages = [{k: v for k, v in m.items() if k not in ("tool_calls", "reasoning_content")} | {"content": m["content"] or ""}
                    for m in messages]
    chat = ChatTemplate(HFTokenizer(assets), assets, kwargs)
    hf = hf_tokenizer(template)
    for generation_prompt in (False, True):
        want = hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        assert chat.render(messages, tools, add_generation_prompt=generation_prompt) == want
    ids, trained = chat.encode(messages, tools)
    assert ids == hf.apply_chat_template(messages, tools=tools, tokenize=True, **kwargs)["input_ids"]
    if flavor == "qwen2.5":
        assert chat.render(messages, tools).startswith("<|im_start|>system\nYou are a helpful assistant .") == (case != "plain")
    else:  # the mask rule, spelled out per conversation
        assert hf.decode([t for t, learn in zip(ids, trained) if learn]) == TRAINED[case]


def test_trained_tokens_are_the_assistant_turns(tmp_path):
    """Independently of the template: the whole rendering tokenized once, trained = every token
    inside an assistant turn's content or its closing <|im_end|>; labels = next token if trained."""
    recipe = build_recipe(parse_config(["--job.config_file", "train_configs/debug_sft.toml", "--training.seq_len", "1024"]))
    text = recipe.chat.render(TOOL_CALLS, TOOLS)
    encoding = recipe.tokenizer.tokenizer.encode(text, add_special_tokens=False)
    spans, start = [], 0
    while (start := text.find("<|im_start|>assistant\n", start)) >= 0:
        begin = start + len("<|im_start|>assistant\n")
        start = text.index("<|im_end|>", begin) + len("<|im_end|>")
        spans.append((begin, start))
    assert len(spans) == 2
    want = [any(b <= s < e for b, e in spans) for s, _ in encoding.offsets]
    tokens, labels = recipe.encode({"messages": TOOL_CALLS, "tools": TOOLS})
    assert tokens == encoding.ids
    assert labels == [t if w else IGNORE_INDEX for t, w in zip(tokens[1:], want[1:])] + [IGNORE_INDEX]


def test_named_templates_and_fallback(tmp_path, capsys):
    """tokenizer_config.json's list form picks "tool_use" for a conversation with tools; a folder
    without a template renders Qwen's plain turns and says so once."""
    named = [{"name": "default", "template": QWEN25_LIKE}, {"name": "tool_use", "template": debug_template()}]
    folder = assets_with(tmp_path, "named", template=named)
    chat = ChatTemplate(HFTokenizer(folder), folder, {})
    assert chat.render(PLAIN[1:3]).startswith("<|im_start|>system\nYou are a helpful assistant .")
    assert chat.render(TOOL_CALLS, TOOLS) == hf_tokenizer(debug_template()).apply_chat_template(TOOL_CALLS, tools=TOOLS, tokenize=False)

    plain = assets_with(tmp_path, "plain")
    capsys.readouterr()
    recipe = build_recipe(parse_config(["--job.config_file", "train_configs/debug_sft.toml", "--model.hf_assets_path", plain]))
    assert "has no chat template" in capsys.readouterr().out
    assert recipe.chat.render(PLAIN) == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in PLAIN)
    with pytest.raises(DataError, match="role 'tool' is not one the chat template renders"):
        recipe.encode({"messages": TOOL_CALLS})


def write_records(path, records) -> str:
    with open(path, "w") as f:
        f.write("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "function", "content": "x"}, *PLAIN[1:3]]}, "role 'function' is not one the chat template renders"),
    ({"messages": PLAIN[1:2]}, "no assistant turn"),
    ({"messages": [PLAIN[1], PLAIN[0], PLAIN[2]]}, "TemplateError: a system message must come first"),
    ({"messages": [{"content": "no role"}, *PLAIN[1:3]]}, "messages must be a list"),
])
def test_refusals_name_file_and_line(record, message, tmp_path, qwen25_assets):
    """The bad record is the third non-blank line (line 4: a blank line before it); the stream meets it."""
    path = tmp_path / "sft.jsonl"
    write_records(path, [{"messages": PLAIN}])
    path.write_text(path.read_text() + json.dumps({"messages": PLAIN}) + "\n\n" + json.dumps(record) + "\n")
    recipe = build_recipe(parse_config(["--job.config_file", "train_configs/debug_sft.toml", "--training.dataset_path", str(path),
                                        "--model.hf_assets_path", qwen25_assets]))
    stream = recipe.build_stream()
    with pytest.raises(DataError) as info:
        stream.next_rows(3, [], RowLength(256, 256))
    assert str(info.value).startswith(f"{path}:4: ") and message in str(info.value), str(info.value)


def test_truncation_is_counted_and_nothing_to_learn_refused(tmp_path, capsys):
    long = {"messages": [PLAIN[0], {"role": "user", "content": "count : " + " ".join(map(str, range(200)))}, PLAIN[2]]}
    path = write_records(tmp_path / "sft.jsonl", [{"messages": PLAIN}, long])
    args = ["--job.config_file", "train_configs/debug_sft.toml", "--training.dataset_path", path]
    stream = build_recipe(parse_config(args)).build_stream()
    capsys.readouterr()
    stream.next_rows(2, [], RowLength(128, 128))  # one pass: the long record closes it, carried into the second row
    assert capsys.readouterr().out.count(f"sft: conversations of {path}: 1 of 2 were cut to rows of 128 tokens") == 1
    stream = build_recipe(parse_config(args)).build_stream()
    with pytest.raises(DataError, match="no document keeps a labelled token within rows of 16 tokens"):
        stream.next_rows(3, [], RowLength(16, 16))


def test_show_sft_writes_what_the_recipe_trains(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    show_sft.main(["--job.config_file", "train_configs/debug_sft.toml", "--output", str(out), "--limit", "4", "--print", "1"])
    printed = capsys.readouterr().out
    recipe = build_recipe(parse_config(["--job.config_file", "train_configs/debug_sft.toml"]))
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == 4
    for index, line in enumerate(lines):
        tokens, labels = recipe.encode(recipe.documents[index])
        assert line["input_ids"] == tokens
        assert [label != IGNORE_INDEX for label in labels] == [bool(t) for t in line["trained"][1:]] + [False]
    assert printed.count("--- record") == 1 and "wrote 4 records" in printed
    assert "<|im_start|>assistant\n[[<think>\n\n</think>\n\n15 plus 14 is 29 .<|im_end|>]]\n" in printed


def test_policy_text_through_the_template(tmp_path):
    """The prompt is exactly the generation prompt a sampler saw; the response is the rest of the assistant turn."""
    path = write_records(tmp_path / "rollouts.jsonl", [{"prompt": "what is 2 plus 3 ?", "response": "5 .", "advantage": 1.0}])
    hf = hf_tokenizer(debug_template())
    user = [{"role": "user", "content": "what is 2 plus 3 ?"}]
    for overrides, response in (([], "<think>\n\n</think>\n\n5 .<|im_end|>"),
                                (["--recipe.chat_template_kwargs", "enable_thinking", "False"], "5 .<|im_end|>")):
        job_config = parse_config(["--job.config_file", "train_configs/debug_policy.toml", "--training.dataset_path", path,
                                   "--recipe.apply_chat_template", *overrides])
        recipe = build_recipe(job_config)
        tokens, labels, *_ = recipe.encode(recipe.documents[0])
        prompt = hf.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                        **job_config.recipe.chat_template_kwargs)["input_ids"]
        assert tokens[: len(prompt)] == prompt
        assert hf.decode(tokens[len(prompt):]) == response
        assert labels == [IGNORE_INDEX] * (len(prompt) - 1) + tokens[len(prompt):] + [IGNORE_INDEX]


def test_chat_template_kwargs_config(tmp_path):
    base = open(os.path.join(ROOT, "train_configs", "debug_sft.toml")).read()
    for value, ok in (("{enable_thinking = false, depth = 2}", True), ("{enable_thinking = [1]}", False)):
        path = tmp_path / "config.toml"
        path.write_text(base.replace("chat_template_kwargs = {}", f"chat_template_kwargs = {value}"))
        if ok:
            assert parse_config(["--job.config_file", str(path)]).recipe.chat_template_kwargs == {"enable_thinking": False, "depth": 2}
        else:
            with pytest.raises(ConfigError, match="recipe.chat_template_kwargs"):
                parse_config(["--job.config_file", str(path)])
