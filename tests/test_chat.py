"""The chat template of the shipped tokenizer (a conversation staged as a scene), `render_chat`, and `LLM.chat`."""

import json

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from llminfer import LLM, SamplingParams
from llminfer.chat import SHAKESPEARE_CHAT_TEMPLATE, check_messages, render_chat
from llminfer.models.loader import load_tokenizer
from llminfer.models.registry import SHIPPED

GREEDY = SamplingParams(temperature=0, max_tokens=8)
SCENE = [
    {"role": "system", "content": "A street in Verona."},
    {"role": "user", "content": "What light through yonder window breaks?\n"},
    {"role": "assistant", "content": [{"type": "text", "text": "It is the east,"},
                                      {"type": "text", "text": "and Juliet is the sun."}]},
    {"role": "user", "name": "first_citizen", "content": "Speak, speak."},
]
EXPECTED = ("Chorus:\nA street in Verona.\n\n"
            "ROMEO:\nWhat light through yonder window breaks?\n\n"
            "JULIET:\nIt is the east,\nand Juliet is the sun.\n\n"
            "FIRST CITIZEN:\nSpeak, speak.\n\n"
            "JULIET:\n")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SHIPPED["tiny-shakespeare"])


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny-shakespeare", device="cpu")


def reference(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The template's documented rules, written out in Python."""
    speakers = {"system": "Chorus", "developer": "Chorus", "user": "ROMEO", "assistant": "JULIET"}
    text, reply = "", "JULIET"
    for m in messages:
        content = m["content"] if isinstance(m["content"], str) else "\n".join(p["text"] for p in m["content"])
        speaker = m["name"].replace("_", " ").upper() if m.get("name") else speakers[m["role"]]
        reply = speaker if m["role"] == "assistant" else reply
        text += f"{speaker}:\n{content.strip(chr(13) + chr(10))}\n\n"
    return text + (f"{reply}:\n" if add_generation_prompt else "")


# --- the template --------------------------------------------------------------------------------------------------

def test_template_stages_the_conversation_as_a_scene(tokenizer):
    assert render_chat(tokenizer, SCENE) == EXPECTED == reference(SCENE)
    assert render_chat(tokenizer, SCENE, add_generation_prompt=False) == EXPECTED.removesuffix("JULIET:\n")
    named = [*SCENE, {"role": "assistant", "name": "Nurse", "content": "Anon!"}, {"role": "user", "content": "Hm?"}]
    assert render_chat(tokenizer, named).endswith("NURSE:\nAnon!\n\nROMEO:\nHm?\n\nNURSE:\n")
    assert render_chat(tokenizer, [{"role": "developer", "content": "Act I."}]) == "Chorus:\nAct I.\n\nJULIET:\n"


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_tokenizer_configs_hold_the_template_and_transformers_reads_it(name, tokenizer):
    config = json.loads((SHIPPED[name] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == SHAKESPEARE_CHAT_TEMPLATE
    assert load_tokenizer(SHIPPED[name]).chat_template == SHAKESPEARE_CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(SHIPPED[name])
    assert hf.apply_chat_template(SCENE, tokenize=False, add_generation_prompt=True) == EXPECTED
    with pytest.raises(jinja2.TemplateError, match="must be system, developer, user or assistant, not tool"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_continue_final_message_prefills_the_reply(tokenizer):
    prefill = [*SCENE[:2], {"role": "assistant", "content": "It is "}]
    assert render_chat(tokenizer, prefill, add_generation_prompt=False, continue_final_message=True) == (
        "Chorus:\nA street in Verona.\n\nROMEO:\nWhat light through yonder window breaks?\n\nJULIET:\nIt is ")
    empty = [SCENE[1], {"role": "assistant", "content": ""}]
    assert render_chat(tokenizer, empty, add_generation_prompt=False, continue_final_message=True).endswith("JULIET:\n")
    with pytest.raises(ValueError, match="pass add_generation_prompt=False with it"):
        render_chat(tokenizer, prefill, continue_final_message=True)


def test_template_override_kwargs_and_a_tokenizer_without_template(tokenizer):
    own = "{{ greeting }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }};{% endfor %}"
    assert render_chat(tokenizer, SCENE[:2], chat_template=own, chat_template_kwargs={"greeting": "Hail! "}) == (
        "Hail! [system] A street in Verona.;[user] What light through yonder window breaks?\n;")
    with pytest.raises(ValueError, match="chat_template_kwargs cannot set 'add_generation_prompt'"):
        render_chat(tokenizer, SCENE, chat_template_kwargs={"add_generation_prompt": False})
    with pytest.raises(ValueError, match="the chat template failed: TemplateSyntaxError"):
        render_chat(tokenizer, SCENE, chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match="chat_template must be a non-empty str"):
        render_chat(tokenizer, SCENE, chat_template="")
    bare = AutoTokenizer.from_pretrained(SHIPPED["tiny-shakespeare"])
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template: pass chat_template="):
        render_chat(bare, SCENE)
    with pytest.raises(ValueError, match="rendering a chat needs a tokenizer"):
        render_chat(None, SCENE)


# --- LLM.chat ------------------------------------------------------------------------------------------------------

def test_llm_chat_equals_generate_on_the_rendered_prompt(llm, tokenizer):
    other = [{"role": "user", "content": "Good morrow, cousin."}]
    chats = llm.chat([SCENE, other], GREEDY, use_tqdm=False)
    generated = llm.generate([render_chat(tokenizer, SCENE), render_chat(tokenizer, other)], GREEDY, use_tqdm=False)
    assert [o.prompt for o in chats] == [EXPECTED, "ROMEO:\nGood morrow, cousin.\n\nJULIET:\n"]
    assert [o.outputs[0].token_ids for o in chats] == [o.outputs[0].token_ids for o in generated]
    assert all(len(o.outputs[0].token_ids) == 8 for o in chats)
    one = llm.chat(other, GREEDY, use_tqdm=False)
    assert len(one) == 1 and one[0].outputs[0].text == chats[1].outputs[0].text
    prefill = llm.chat([*other, {"role": "assistant", "content": "Good"}], GREEDY, use_tqdm=False,
                       add_generation_prompt=False, continue_final_message=True)[0]
    assert prefill.prompt.endswith("JULIET:\nGood")
    assert not llm.llm_engine.has_unfinished_requests()


HOSTILE = [
    ("To be, or not to be", r"messages must be a list of message dicts, got str"),
    (None, r"messages must be a list of message dicts, got NoneType"),
    ([], r"messages is empty: a conversation needs at least one message"),
    (["hi"], r"messages\[0\] must be a dict with 'role' and 'content', got str"),
    ([{"content": "hi"}], r"messages\[0\] has no 'role'"),
    ([{"role": "user", "content": "hi"}, {"role": "user"}], r"messages\[1\] has no 'content'"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\]\['role'\] must be one of 'system', 'developer', "
                                           r"'user', 'assistant', got 'robot'"),
    ([{"role": "tool", "content": "42"}], r"messages\[0\]\['role'\] must be one of .*got 'tool'"),
    ([{"role": ["user"], "content": "hi"}], r"messages\[0\]\['role'\] must be one of .*got \['user'\]"),
    ([{"role": "user", "content": 42}], r"messages\[0\]\['content'\] must be a str or a list of text parts, got int"),
    ([{"role": "assistant", "content": None}], r"messages\[0\]\['content'\] must be a str .*got NoneType"),
    ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\['content'\]\[0\] must be a dict like"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
     r"messages\[0\]\['content'\]\[0\]\['type'\] is 'image_url'; llminfer's models read text only"),
    ([{"role": "user", "content": [{"type": "text", "text": 5}]}],
     r"messages\[0\]\['content'\]\[0\]\['text'\] must be a str, got int"),
    ([{"role": "user", "content": "ab\ud800"}],
     r"messages\[0\]\['content'\] is not valid Unicode text: surrogates not allowed at index 2 \('\\ud800'\)"),
    ([{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}],
     r"messages\[0\]\['content'\]\[0\]\['text'\] is not valid Unicode text"),
    ([{"role": "user", "content": "hi", "name": 7}], r"messages\[0\]\['name'\] must be a str, got int"),
    ([{"role": "user", "content": "hi", "name": "ROMEO:\nJULIET"}], r"messages\[0\]\['name'\] must be 1 to 64 "
                                                                    r"characters.*got 'ROMEO:\\nJULIET'"),
    ([{"role": "user", "content": "hi", "name": "   "}], r"messages\[0\]\['name'\] must be 1 to 64 characters"),
    ([{"role": "user", "content": "hi", "name": "A" * 65}], r"messages\[0\]\['name'\] must be 1 to 64 characters"),
    ([[{"role": "user", "content": "hi"}], [{"role": "bard", "content": "hi"}]],
     r"conversation 1: messages\[0\]\['role'\] must be one of .*got 'bard'"),
    ([[{"role": "user", "content": "hi"}], []], r"conversation 1: messages is empty"),
]


@pytest.mark.parametrize(("messages", "match"), HOSTILE)
def test_bad_messages_raise_value_error_naming_the_problem(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        llm.chat(messages, GREEDY, use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_options_and_huge_values_fail_clearly_and_the_engine_carries_on(llm):
    with pytest.raises(ValueError, match="add_generation_prompt must be a bool, got 'yes'"):
        llm.chat(SCENE, GREEDY, use_tqdm=False, add_generation_prompt="yes")
    with pytest.raises(ValueError, match="got 1 sampling params for 2 prompts"):
        llm.chat([SCENE, SCENE], [GREEDY], use_tqdm=False)
    with pytest.raises(ValueError) as caught:
        llm.chat([{"role": "x" * 1_000_000, "content": "hi"}], GREEDY, use_tqdm=False)
    assert len(str(caught.value)) < 200      # the bad value is quoted, cut short
    # A message longer than the context fails as its output, as a too-long prompt does in generate().
    huge = llm.chat([{"role": "user", "content": "To be, or not to be. " * 20_000}], GREEDY, use_tqdm=False)[0]
    assert huge.outputs[0].finish_reason == "error" and "the model's context is 1024" in huge.error
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.chat(SCENE, GREEDY, use_tqdm=False)[0].outputs[0].token_ids   # still works


def test_unicode_and_template_syntax_in_messages_render_verbatim(llm, tokenizer):
    texts = ["O brave new world 🌍🎭", "生存还是毁灭", "אהבה היא עשן", "الحب دخان", "{{ 7 * 7 }} {% raw %}"]
    messages = [{"role": "user", "content": text} for text in texts]
    prompt = render_chat(tokenizer, messages)
    assert prompt == "".join(f"ROMEO:\n{text}\n\n" for text in texts) + "JULIET:\n"
    out = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert out.prompt == prompt and out.error is None and len(out.outputs[0].token_ids) == 8
    assert tokenizer.decode(tokenizer.encode(prompt, add_special_tokens=False)) == prompt


# --- properties ----------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
NAME = st.text(st.sampled_from("abcxyzABCXYZ019 _-'ßé"), min_size=1, max_size=12).filter(str.strip)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]),
     "content": TEXT | st.lists(st.builds(lambda t: {"type": "text", "text": t}, TEXT), max_size=3)},
    optional={"name": NAME})


@settings(max_examples=50, deadline=None)
@given(messages=st.lists(MESSAGE, min_size=1, max_size=6), add_generation_prompt=st.booleans())
def test_any_valid_conversation_renders_as_the_rules_say_and_as_transformers_does(tokenizer, messages,
                                                                                 add_generation_prompt):
    prompt = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    assert prompt == reference(messages, add_generation_prompt)
    assert prompt == tokenizer.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)


JUNK = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["role", "content", "name", "type", "text"]), inner, max_size=4),
                    max_leaves=12)


@settings(max_examples=50, deadline=None)
@given(messages=JUNK | st.lists(MESSAGE | JUNK, max_size=4))
def test_any_input_renders_or_raises_value_error(tokenizer, messages):
    try:
        prompt = render_chat(tokenizer, messages)
    except ValueError as exc:
        assert str(exc)
    else:
        assert prompt == reference(check_messages(messages))
