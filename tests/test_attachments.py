"""Images and documents reaching a model that reads text: PDFs as their text (pypdf),
images as a note that says so, counted in the request log."""

from __future__ import annotations

import base64
import json

from anyclaude import prompt
from anyclaude.api import wire


def pdf(*pages: str) -> bytes:
    """A real PDF file with one line of text per page (Helvetica), xref and all."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 20 50 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 100] /Contents {len(objects) + 2} 0 R /Resources << /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>".encode())
        kids.append(f"{len(objects)} 0 R")
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>".encode()
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def document(data: bytes, media_type: str = "application/pdf") -> dict:
    return {"type": "document", "title": "notes.pdf", "source": {"type": "base64", "media_type": media_type, "data": base64.b64encode(data).decode()}}


def render(tokenizer, content: list[dict]):
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": content}]}
    request = wire.decode_request(json.dumps(body).encode())
    return request, prompt.render(request, tokenizer)


def test_a_pdf_reaches_the_model_as_its_text(tokenizer):
    _, rendered = render(tokenizer, [document(pdf("Invoice number 4711", "Total due: 99 EUR")), {"type": "text", "text": "What is due?"}])
    text = rendered.text
    assert "notes.pdf" in text and text.index("Invoice number 4711") < text.index("Total due: 99 EUR") < text.index("What is due?")


def test_a_pdf_read_by_the_read_tool_comes_back_in_its_result(tokenizer):
    read = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/a.pdf"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [document(pdf("Chapter one"))]}
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "Read it"}, {"role": "assistant", "content": [read]}, {"role": "user", "content": [result]}]}
    assert "Chapter one" in prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer).text


def test_what_cannot_be_read_is_said_in_the_prompt(tokenizer):
    for data, media_type, why in [(b"not a pdf at all", "application/pdf", "a PDF, but it cannot be read"), (b"\x00\x01", "application/zip", "application/zip")]:
        _, rendered = render(tokenizer, [document(data, media_type), {"type": "text", "text": "Look."}])
        assert f"cannot be read as text: {why}" in rendered.text


def test_images_are_a_note_and_counted(tokenizer):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]}
    read = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/a.png"}}
    body = {
        "model": "m", "max_tokens": 5,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "And this one:"}]}, {"role": "assistant", "content": [read]}, {"role": "user", "content": [result]}],
    }
    rendered = prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer)
    assert rendered.text.count(prompt.IMAGE_NOTE) == 2
    assert rendered.images == 2
