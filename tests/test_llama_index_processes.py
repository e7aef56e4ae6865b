"""A fact told through each LlamaIndex adapter is recalled by a new process."""

from __future__ import annotations

import json

from _llama_index_support import FACT, RECALLED, ScriptedLLM, ask, flush, in_new_process
from llama_index.core.memory import Memory

from headroom_memory_integrations.llama_index import (
    HeadroomChatMemoryBuffer,
    HeadroomMemoryBlock,
    MemoryLLM,
)


def test_each_adapter_recalls_in_a_new_process(db_path, model) -> None:
    llm = ScriptedLLM()
    buffer = HeadroomChatMemoryBuffer.from_defaults(
        user_id="buffer-user", db_path=db_path, embedder=model, llm=llm
    )
    block = HeadroomMemoryBlock(user_id="block-user", db_path=db_path, embedder=model, llm=llm)
    wrapped = MemoryLLM(llm=ScriptedLLM(), user_id="llm-user", db_path=db_path, embedder=model)
    ask("simple", llm, buffer, FACT, "sync")
    ask("function_agent", llm, Memory.from_defaults(memory_blocks=[block]), FACT, "async")
    ask("context", wrapped, None, FACT, "stream")
    for store in (buffer.memory, block.memory, wrapped.memory):
        flush(store)
        assert [m.text for m in store.get_all()] == [FACT]

    out = in_new_process(
        f"""
        import json
        from _llama_index_support import QUESTION, ScriptedLLM, ask
        from llama_index.core.memory import Memory
        from headroom_memory_integrations.llama_index import (
            HeadroomChatMemoryBuffer, HeadroomMemoryBlock, MemoryLLM)

        llm, where = ScriptedLLM(), {str(db_path)!r}
        buffer = HeadroomChatMemoryBuffer.from_defaults(
            user_id="buffer-user", db_path=where, llm=llm
        )
        block = HeadroomMemoryBlock(user_id="block-user", db_path=where, llm=llm)
        wrapped = MemoryLLM(llm=ScriptedLLM(), user_id="llm-user", db_path=where)
        with_block = Memory.from_defaults(memory_blocks=[block])
        answers = [
            ask("simple", llm, buffer, QUESTION, "sync").text,
            ask("function_agent", llm, with_block, QUESTION, "async").text,
            ask("context", wrapped, None, QUESTION, "stream").text,
        ]
        for store in (buffer.memory, block.memory, wrapped.memory):
            store.flush(30)
        print(json.dumps(answers))
        """
    )
    assert json.loads(out.splitlines()[-1]) == [f"{RECALLED} {FACT}"] * 3
