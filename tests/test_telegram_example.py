"""examples/telegram_bot.py against a running service, with constructed Telegram updates (no network)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("telegram")
pytest.importorskip("fastapi")
from openai import AsyncOpenAI  # noqa: E402
from telegram import Bot, Update  # noqa: E402

from personaweave.serving import PersonaService, Storage, create_app  # noqa: E402
from personaweave.serving.memory import Memory  # noqa: E402
from personaweave.testing import serve_in_thread, tiny_persona_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bot_module():
    spec = importlib.util.spec_from_file_location("telegram_bot", ROOT / "examples" / "telegram_bot.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sent(monkeypatch):
    """Messages the bot would send: Bot.send_message recorded instead of calling Telegram."""
    out = []

    async def send_message(self, chat_id, text, **kwargs):
        out.append((chat_id, text))

    monkeypatch.setattr(Bot, "send_message", send_message)
    return out


def update(text: str, user: int = 7, chat: int = 42) -> Update:
    data = {"update_id": 1, "message": {"message_id": 1, "date": 0, "text": text,
                                        "chat": {"id": chat, "type": "private"},
                                        "from": {"id": user, "is_bot": False, "first_name": "Ada"}}}
    return Update.de_json(data, Bot("123456:TEST"))


def test_bot_forwards_messages_and_commands_to_the_service(bot_module, sent, tmp_path, hash_encoder):
    model, tok = tiny_persona_model()
    service = PersonaService(model.eval(), tok, Storage(f"sqlite:///{tmp_path}/db.sqlite"),
                             memory=Memory(hash_encoder), max_new_tokens=5)
    app = bot_module.build_application("123456:TEST", "http://unused/v1")  # handlers wire up offline
    assert len(app.handlers[0]) == 3

    stored = []

    async def conversation(url):
        context = SimpleNamespace(bot_data={"client": AsyncOpenAI(base_url=f"{url}/v1", api_key="none"),
                                            "persona": "pirate"}, chat_data={}, args=["robot"])
        await bot_module.on_message(update("hello what should i read ?"), context)
        await bot_module.on_persona(update("/persona robot"), context)
        await bot_module.on_message(update("why is the sea good ?"), context)
        stored.append(service.storage.count_turns("telegram-7"))
        stored.append([t["persona"] for t in service.storage.history("telegram-7")])
        context.args = ["ghost"]
        await bot_module.on_persona(update("/persona ghost"), context)
        context.chat_data["persona"] = "ghost"  # a persona the service does not know: an apology, no crash
        await bot_module.on_message(update("hello"), context)
        await bot_module.on_forget(update("/forget"), context)
        await bot_module.on_forget(update("/forget"), context)
        down = SimpleNamespace(bot_data={"client": AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="none",
                                                               max_retries=0)}, chat_data={}, args=[])
        await bot_module.on_message(update("anyone there?"), down)  # service unreachable: an apology
        return context

    with serve_in_thread(create_app(service)) as url:
        asyncio.run(conversation(url))
    assert [chat for chat, _ in sent] == [42] * 8
    texts = [text for _, text in sent]
    assert texts[1] == "Now speaking as robot." and texts[3].startswith("Usage: /persona NAME")
    assert "(404)" in texts[4]
    assert texts[5] == "I have forgotten our conversations." and texts[6] == "There was nothing to forget."
    assert texts[7] == "Sorry, the persona service is not reachable right now."
    assert stored[0] == 4  # two exchanges, stored under the Telegram user's id
    assert stored[1] == ["pirate", "pirate", "robot", "robot"]  # /persona robot switched the second one
    assert service.storage.count_turns("telegram-7") == 0  # /forget deleted them
