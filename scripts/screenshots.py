"""Screenshots of the real Prefect UI for the README, taken by headless Chromium (Debian's `chromium`).

    python scripts/screenshots.py --model-dir FOLDER --out DIR

Starts the stack of scripts/e2e.py with the UI on, runs `log-and-validate/default` on the model, starts
`promote/default` (it pauses for approval), then saves:

- run-form.png            the typed parameter form of log-and-validate (Deployments > Run > Custom run)
- validation-report.png   the validation report, a markdown artifact of the flow run
- validation-checks.png   the checks table artifact
- approval-form.png       the paused promote run with its Resume form (approve, alias, approver, comment)

Chromium is driven through the DevTools protocol (the `websockets` package, already installed), so
the page can be clicked (the Resume button) before the picture is taken.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import free_port, running_stack

WIDTH, HEIGHT = 1440, 1000


class Browser:
    """One headless Chromium page, driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def goto(self, url: str, settle_s: float = 6.0) -> None:
        await self.call("Page.navigate", url=url)
        await asyncio.sleep(settle_s)  # the UI is a single-page app that loads its data after navigation

    async def click_text(self, text: str) -> bool:
        script = (
            "(() => { const b = [...document.querySelectorAll('button')]"
            f".find(e => e.innerText.trim() === {json.dumps(text)}); if (b) {{ b.click(); return true; }}"
            " return false; })()"
        )
        result = await self.call("Runtime.evaluate", expression=script, returnByValue=True)
        return bool(result.get("result", {}).get("value"))

    async def shoot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        print("saved", path)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("Chromium is not installed: `apt-get install chromium` (Debian's package).")


async def _capture(pages: list[tuple[str, str, str | None]], out: Path) -> None:
    import websockets

    port = free_port()
    profile = tempfile.mkdtemp(prefix="llmadapter-chromium-")
    proc = subprocess.Popen(
        [
            _chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            f"--window-size={WIDTH},{HEIGHT}",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={profile}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        targets: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not targets:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
                    targets = [t for t in json.loads(response.read()) if t.get("type") == "page"]
            except OSError:
                await asyncio.sleep(0.5)
        if not targets:
            raise RuntimeError("Chromium did not open a page")
        async with websockets.connect(targets[0]["webSocketDebuggerUrl"], max_size=2**26) as ws:
            browser = Browser(ws)
            await browser.call("Page.enable")
            await browser.call(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=HEIGHT,
                deviceScaleFactor=1,
                mobile=False,
            )
            for name, url, click in pages:
                await browser.goto(url)
                if click is not None and await browser.click_text(click):
                    await asyncio.sleep(3)
                await browser.shoot(out / name)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


def _api(stack: Any, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        f"{stack.prefect_api}{path}",
        data=data,
        method="POST" if data is not None else "GET",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True, help="Model folder to log (a tiny model is enough).")
    parser.add_argument("--out", type=Path, required=True, help="Folder for the PNG files.")
    parser.add_argument("--model-name", default="smollm2-chat")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    with running_stack(ui=True) as stack:
        stack.run_deployment(
            "log-and-validate/default",
            {"source": args.model_dir, "task": "llm/v1/chat", "model_name": args.model_name},
        )
        stack.run(
            [
                str(Path(sys.executable).parent / "prefect"),
                "deployment",
                "run",
                "promote/default",
                "--params",
                json.dumps({"model_name": args.model_name, "version": 1, "timeout_s": 3600}),
            ]
        )
        deadline = time.monotonic() + 300
        paused: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not paused:
            time.sleep(2)
            paused = _api(
                stack, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}}
            )
        if not paused:
            raise RuntimeError("the promote run never paused:\n" + stack.log_tail("worker"))
        deployments = _api(stack, "/deployments/filter", {"deployments": {"name": {"any_": ["default"]}}})
        log_deployment = next(d for d in deployments if d["entrypoint"].endswith(":log_and_validate"))
        artifacts = {a["key"]: a for a in _api(stack, "/artifacts/latest/filter", {})}
        ui = stack.prefect_api.removesuffix("/api")
        key = f"validation-{args.model_name}"
        pages = [
            ("run-form.png", f"{ui}/deployments/deployment/{log_deployment['id']}/run", "Custom run"),
            ("validation-report.png", f"{ui}/artifacts/artifact/{artifacts[key]['latest_id']}", None),
            (
                "validation-checks.png",
                f"{ui}/artifacts/artifact/{artifacts[key + '-checks']['latest_id']}",
                None,
            ),
            ("approval-form.png", f"{ui}/runs/flow-run/{paused[0]['id']}", "Resume"),
        ]
        asyncio.run(_capture(pages, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
