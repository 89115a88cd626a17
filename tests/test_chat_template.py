import pytest

from edgellm_steps.errors import ChatTemplateError
from edgellm_steps.export.chat_template import process_chat_template
from edgellm_steps.models.demo import train_tokenizer


def test_chatml_with_default_system_prompt():
    processed = process_chat_template(train_tokenizer("qwen2"))
    assert processed["roles"]["user"] == {"prefix": "<|im_start|>user\n", "suffix": "<|im_end|>\n"}
    assert processed["roles"]["system"] == {"prefix": "<|im_start|>system\n", "suffix": "<|im_end|>\n"}
    assert processed["generation_prompt"] == "<|im_start|>assistant\n"
    assert processed["default_system_prompt"] == "You are a helpful assistant."


def test_llama3_style_keeps_bos_in_the_system_prefix():
    processed = process_chat_template(train_tokenizer("llama"))
    assert processed["roles"]["system"]["prefix"] == "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    assert processed["roles"]["assistant"] == {
        "prefix": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "suffix": "<|eot_id|>",
    }
    assert "default_system_prompt" not in processed


def test_template_without_fixed_turns_is_refused():
    tokenizer = train_tokenizer("qwen2")
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="--chat_template"):
        process_chat_template(tokenizer)


def test_missing_template_is_refused():
    tokenizer = train_tokenizer("qwen2")
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        process_chat_template(tokenizer)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_vlm_content_types_from_rendering_media_parts(family):
    """The tiny VLM's Qwen2-VL template renders an image part as its pad token between the vision markers."""
    processed = process_chat_template(train_tokenizer(family), vision_language=True)
    assert processed["content_types"] == {
        "image": {"format": "<|vision_start|><|image_pad|><|vision_end|>"},
        "video": {"format": "<|vision_start|><|video_pad|><|vision_end|>"},
    }
    # The text roles are those of ChatML, as for the text-only Qwen2.
    assert processed["roles"] == process_chat_template(train_tokenizer("qwen2"))["roles"]


def test_llm_templates_have_no_content_types():
    assert process_chat_template(train_tokenizer("qwen2"))["content_types"] == {}
    # A text-only template renders no media part even when asked for content types.
    assert process_chat_template(train_tokenizer("qwen2"), vision_language=True)["content_types"] == {}
    assert process_chat_template(train_tokenizer("llama"), vision_language=True)["content_types"] == {}
    # One that prints the content as is renders the parts list's repr, which is no media format.
    tokenizer = train_tokenizer("qwen2")
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    assert process_chat_template(tokenizer, vision_language=True)["content_types"] == {}
