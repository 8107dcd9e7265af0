"""A Telegram bot that speaks through the personaweave service.

Every text message is forwarded to the service's OpenAI-compatible endpoint with the Telegram
user as `user`, so the service keeps that user's history, memories and adaptive persona.

    personaweave serve --model outputs/sft_persona/final --port 8000 &
    TELEGRAM_TOKEN=... python examples/telegram_bot.py --service http://127.0.0.1:8000/v1 --persona auto

Commands: /persona NAME (switch persona for this chat: a bank name, a blend spec or "auto"),
/forget (delete what the service stores about you). Needs `pip install "personaweave[telegram]"`.
"""

from __future__ import annotations

import argparse
import os

from openai import APIError, APIStatusError, AsyncOpenAI
from telegram import Update
from telegram.ext import Application, CommandHandler, ContextTypes, MessageHandler, filters


def user_id(update: Update) -> str:
    return f"telegram-{update.effective_user.id}"


async def on_message(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Forward the message, reply with the persona's answer (or the service's error, briefly)."""
    client: AsyncOpenAI = context.bot_data["client"]
    persona = context.chat_data.get("persona", context.bot_data.get("persona", "auto"))
    try:
        completion = await client.chat.completions.create(
            model=persona, user=user_id(update), messages=[{"role": "user", "content": update.message.text}])
        reply = completion.choices[0].message.content or "..."
    except APIStatusError as err:  # unknown persona, oversized message: tell the user, don't crash
        reply = f"Sorry, the persona service refused that ({err.status_code})."
    except APIError:  # the service is down or timed out
        reply = "Sorry, the persona service is not reachable right now."
    await update.message.reply_text(reply)


async def on_persona(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    client: AsyncOpenAI = context.bot_data["client"]
    names = [m.id async for m in client.models.list()]
    wanted = " ".join(context.args or [])
    if wanted in names or wanted.startswith("blend:"):
        context.chat_data["persona"] = wanted
        await update.message.reply_text(f"Now speaking as {wanted}.")
    else:
        await update.message.reply_text("Usage: /persona NAME, one of: " + ", ".join(names))


async def on_forget(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    client: AsyncOpenAI = context.bot_data["client"]
    try:
        await client.delete(f"/users/{user_id(update)}", cast_to=object)
        await update.message.reply_text("I have forgotten our conversations.")
    except APIStatusError as err:
        await update.message.reply_text("There was nothing to forget." if err.status_code == 404
                                        else f"Sorry, the persona service refused that ({err.status_code}).")
    except APIError:
        await update.message.reply_text("Sorry, the persona service is not reachable right now.")


def build_application(token: str, service_url: str, persona: str = "auto") -> Application:
    app = Application.builder().token(token).build()
    # no client retries: a retried chat turn could be stored twice by the service
    app.bot_data.update(client=AsyncOpenAI(base_url=service_url, api_key="none", max_retries=0), persona=persona)
    new_messages = filters.UpdateType.MESSAGE  # edited messages carry no `update.message`
    app.add_handler(CommandHandler("persona", on_persona, filters=new_messages))
    app.add_handler(CommandHandler("forget", on_forget, filters=new_messages))
    app.add_handler(MessageHandler(new_messages & filters.TEXT & ~filters.COMMAND, on_message))
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", default="http://127.0.0.1:8000/v1", help="The service's /v1 URL.")
    parser.add_argument("--persona", default="auto", help="Default persona: a name, a blend spec or auto.")
    args = parser.parse_args()
    token = os.environ.get("TELEGRAM_TOKEN")
    if not token:
        raise SystemExit("Set TELEGRAM_TOKEN to the bot token from @BotFather.")
    build_application(token, args.service, args.persona).run_polling()


if __name__ == "__main__":
    main()
