"""Send one image question to an OpenAI-compatible server and print the answer and sparsity.

    python scripts/demo_client.py http://127.0.0.1:8000
"""

import base64
import io
import sys
import urllib.request

from openai import OpenAI
from PIL import Image, ImageDraw


def picture() -> str:
    img = Image.new("RGB", (448, 448), (30, 120, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle([100, 100, 340, 340], fill=(250, 200, 10))
    draw.ellipse([150, 150, 300, 300], fill=(200, 20, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, max_tokens=24, temperature=0,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": picture()}},
            {"type": "text", "text": "What is in this image?"}]}])
    print(f"answer ({reply.usage.prompt_tokens} prompt tokens, random-weight model, so "
          f"gibberish is expected): {reply.choices[0].message.content!r}")
    metrics = urllib.request.urlopen(base + "/metrics").read().decode()
    for line in metrics.splitlines():
        if line.startswith(("kvsparse_prompt_tokens_seen_total", "kvsparse_prompt_tokens_kept_total",
                            "vllm:time_to_first_token_seconds_count")):
            print("  " + line)


if __name__ == "__main__":
    main()
