"""
The bridge's payload thread: html2text runs on a thread of the bridge's own,
never on the reactor's or in its shared pool, and the thread ends with the
bridge.
"""

from __future__ import annotations

import threading
from email.message import EmailMessage

from twisted.trial.unittest import TestCase

from maillaser import payload
from tests.helpers import TARGET, dispatcher_idle, start_bridge, wait

POOL_NAME = "maillaser-payload"


def payload_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if POOL_NAME in t.name]


def html_only(html: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "sender@test.com"
    message["To"] = TARGET
    message["Subject"] = "html"
    message.set_content(html, subtype="html")
    return message


class PayloadThreadTests(TestCase):
    async def test_html_rendered_on_the_payload_thread(self) -> None:
        rendered_on: list[str] = []
        render = payload._html_to_text

        def recording_render(html: str) -> str:
            rendered_on.append(threading.current_thread().name)
            return render(html)

        self.patch(payload, "_html_to_text", recording_render)
        bridge = await start_bridge(self)
        await bridge.send(html_only("<p>small</p>"))
        [request] = await wait(bridge.receiver.wait_for(1))
        self.assertEqual(request.json()["body"], "small")
        [thread_name] = rendered_on
        self.assertIn(POOL_NAME, thread_name)
        self.assertEqual(len(payload_threads()), 1)

        await dispatcher_idle(bridge)
        await wait(bridge.service.stopService())
        self.assertEqual(payload_threads(), [])
