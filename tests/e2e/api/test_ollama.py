"""The Ollama API through the official `ollama` client."""

import pytest
import ollama

MODEL = "qwen3moe-tiny"


def client(addr):
    return ollama.Client(host=f"http://{addr}")


def test_list_show_ps_version(gateway):
    c = client(gateway)
    models = c.list().models
    assert [m.model for m in models] == [f"{MODEL}:latest"]
    d = models[0].details
    assert d.family == "qwen3moe" and d.quantization_level == "Q8_0" and d.format == "gguf"
    show = c.show(MODEL)
    assert show.modelinfo["general.architecture"] == "qwen3moe"
    assert show.modelinfo["general.parameter_count"] > 0
    assert show.modelinfo["qwen3moe.context_length"] > 0
    assert [m.model for m in c.ps().models] == [f"{MODEL}:latest"]


def test_chat_streaming_and_not(gateway):
    c = client(gateway)
    msgs = [{"role": "user", "content": "Hello"}]
    one = c.chat(model=MODEL, messages=msgs, options={"num_predict": 6, "temperature": 0})
    assert one.done and one.eval_count == 6 and one.done_reason == "length"
    assert one.prompt_eval_count > 0 and one.total_duration > 0
    parts = list(c.chat(model=MODEL, messages=msgs, options={"num_predict": 6, "temperature": 0}, stream=True))
    assert parts[-1].done and parts[-1].eval_count == 6
    assert "".join(p.message.content for p in parts) == one.message.content


def test_generate_stop_seed_raw(gateway):
    c = client(gateway)
    full = c.generate(model=MODEL, prompt="Tell me", options={"num_predict": 20, "temperature": 0}).response
    stop = full[3:5]
    cut = c.generate(model=MODEL, prompt="Tell me", options={"num_predict": 20, "temperature": 0, "stop": [stop]})
    assert cut.response == full[: full.index(stop)] and cut.done_reason == "stop"
    a = c.generate(model=MODEL, prompt="Seeded", options={"num_predict": 8, "seed": 7, "temperature": 0.9}).response
    b = c.generate(model=MODEL, prompt="Seeded", options={"num_predict": 8, "seed": 7, "temperature": 0.9}).response
    assert a == b
    r = c.generate(model=MODEL, prompt="raw text", raw=True, options={"num_predict": 3})
    assert r.eval_count == 3
    assert "".join(p.response for p in c.generate(model=MODEL, prompt="Tell me", options={"num_predict": 20, "temperature": 0}, stream=True)) == full


def test_format_json(gateway, simulated):
    import json
    r = client(gateway).generate(model=MODEL, prompt="jsonplease", format="json")
    assert json.loads(r.response)["b"] == "x"


def test_tool_call(tool_gateway, simulated):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    r = client(tool_gateway).chat(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}], tools=tools, options={"num_predict": 100})
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}


def test_errors(gateway):
    c = client(gateway)
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="llama3", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model=MODEL, prompt="x", options={"num_ctx": 2, "num_predict": 5})
    assert e.value.status_code == 400 and "context length" in e.value.error
