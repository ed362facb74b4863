"""MLXChatModel mechanics on a tiny random llama with SmolLM2's tokenizer, and one
end-to-end question on the real default model."""

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from reverie.runtime.chat_model import MLXChatModel, _StopScanner, to_chat_messages

from conftest import tiny_loaded


@pytest.fixture(scope="module")
def loaded(smollm2_tokenizer):
    with tiny_loaded(smollm2_tokenizer, seed=1) as model:
        yield model


def test_messages_go_through_the_chat_template(loaded):
    msgs = to_chat_messages([SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello"),
                             HumanMessage([{"type": "text", "text": "Again"}])])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    ids = loaded.encode_chat(msgs)
    text = loaded.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")


def test_invoke_reports_token_counts_and_respects_max_tokens(loaded):
    chat = MLXChatModel(loaded=loaded, role="verifier", max_tokens=7)
    reply = chat.invoke("Say something")
    prompt_len = len(loaded.encode_chat([{"role": "user", "content": "Say something"}]))
    assert reply.usage_metadata["input_tokens"] == prompt_len
    assert 1 <= reply.usage_metadata["output_tokens"] <= 7
    assert reply.usage_metadata["total_tokens"] == prompt_len + reply.usage_metadata["output_tokens"]
    assert reply.response_metadata["role"] == "verifier"
    assert chat.invoke("Say something", max_tokens=3).usage_metadata["output_tokens"] <= 3


def test_stream_concatenates_to_invoke(loaded):
    chat = MLXChatModel(loaded=loaded, max_tokens=20)
    chunks = list(chat.stream("Tell me a story"))
    assert len(chunks) > 1
    assert "".join(c.content for c in chunks) == chat.invoke("Tell me a story").content
    assert chunks[-1].usage_metadata["output_tokens"] >= 1


def test_stop_string_cuts_the_text(loaded):
    chat = MLXChatModel(loaded=loaded, max_tokens=30)
    full = chat.invoke("Tell me a story").content
    cut_at = full[len(full) // 2:len(full) // 2 + 2]
    assert cut_at
    short = chat.invoke("Tell me a story", stop=[cut_at]).content
    assert short == full[: full.index(cut_at)]
    assert cut_at not in short


def test_stop_scanner_holds_back_partial_matches():
    scanner = _StopScanner(["END"])
    out = []
    for piece in ["abc E", "N", "X more E", "ND tail"]:
        emit, stopped = scanner.push(piece)
        out.append(emit)
        if stopped:
            break
    assert "".join(out) == "abc ENX more "
    assert stopped


def test_sampling_overrides_per_call(loaded):
    chat = MLXChatModel(loaded=loaded, max_tokens=16)
    greedy = {chat.invoke("Pick a word").content for _ in range(2)}
    hot = {chat.invoke("Pick a word", temperature=3.0).content for _ in range(4)}
    assert len(greedy) == 1
    assert len(hot) > 1
    with pytest.raises(TypeError, match="frequency_penalty"):
        chat.invoke("x", frequency_penalty=1.0)


def test_concurrent_async_calls_batch_and_match_sequential(loaded):
    chat = MLXChatModel(loaded=loaded, max_tokens=10)
    questions = [f"Question number {i}?" for i in range(6)]
    sequential = [chat.invoke(q).content for q in questions]
    before = loaded.engine.stats["max_batch"]
    loaded.engine.stats["max_batch"] = 0

    async def run():
        return await asyncio.gather(*(chat.ainvoke(q) for q in questions))

    replies = asyncio.run(run())
    assert [r.content for r in replies] == sequential
    assert loaded.engine.stats["max_batch"] > 1
    loaded.engine.stats["max_batch"] = max(before, loaded.engine.stats["max_batch"])


@pytest.mark.e2e
def test_default_model_answers_a_question(default_runtime):
    chat = default_runtime.chat_model("student")
    reply = chat.invoke("What is the capital of France?")
    assert "Paris" in reply.content
    assert reply.response_metadata["finish_reason"] == "stop"
