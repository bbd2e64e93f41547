#!/usr/bin/env python3
"""Independent workload generator for turnstile's message-batching policies.

Written WITHOUT looking at turnstile's policy code or its own replay generator:
the model below comes from how people type on WhatsApp and how WhatsApp
clients emit chat states (composing / paused).  See INDEPENDENT.md.

Output: gzip JSON lines, one event per line, all conversations interleaved and
sorted by at_ms:

  {"conv": "ind-00042", "at_ms": 123456, "kind": "message", "text": "можно", "thought": 0}
  {"conv": "ind-00042", "at_ms": 123990, "kind": "typing"}
  {"conv": "ind-00042", "at_ms": 125010, "kind": "paused"}

"thought" is the 0-based index of the request (intended thought) inside its
conversation; all fragments of one request share it.

Ready invocations (these produced the checked-in traces):

  python3 benches/corpus/independent/independent.py --seed 1 --presence-share 1.0 \
      --out benches/corpus/independent/independent-presence.jsonl.gz
  python3 benches/corpus/independent/independent.py --seed 2 --presence-share 0 \
      --out benches/corpus/independent/independent-nopresence.jsonl.gz
  python3 benches/corpus/independent/independent.py --seed 3 \
      --out benches/corpus/independent/independent-mixed.jsonl.gz

Python 3.11, standard library only.
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import random
import sys
from dataclasses import dataclass, field

# --------------------------------------------------------------------------
# Text model: Russian-speaking salon / barbershop clients.
# A request is built as a list of *phrases* (natural split points); the client
# then sends it as k fragments, cutting preferably at phrase boundaries.
# --------------------------------------------------------------------------

SERVICES = [  # (accusative with "на", nominative)
    ("на стрижку", "стрижка"),
    ("на мужскую стрижку", "мужская стрижка"),
    ("на стрижку и бороду", "стрижка с бородой"),
    ("на бороду", "оформление бороды"),
    ("на детскую стрижку", "детская стрижка"),
    ("на маникюр", "маникюр"),
    ("на маникюр с покрытием", "маникюр с покрытием"),
    ("на педикюр", "педикюр"),
    ("на окрашивание", "окрашивание"),
    ("на окрашивание корней", "окрашивание корней"),
    ("на укладку", "укладка"),
    ("на брови", "коррекция бровей"),
    ("на ламинирование ресниц", "ламинирование ресниц"),
    ("на кератин", "кератин"),
    ("на тонирование", "тонирование"),
]
WHEN = [
    "завтра", "сегодня", "на субботу", "в пятницу", "послезавтра",
    "на выходных", "завтра после 18", "сегодня вечером", "в среду утром",
    "на эту неделю", "на следующей неделе", "в понедельник", "на четверг",
    "сегодня после обеда", "завтра с утра",
]
HOURS = ["на 10", "на 11:30", "на 12", "на 14:00", "на 15", "на 16:30",
         "на 17", "на 18:00", "на 19", "часов в 7", "к 12", "после 17"]
MASTERS = ["к Ане", "к Марине", "к Артёму", "к Диме", "к Свете",
           "к любому мастеру", "к тому же мастеру что в прошлый раз",
           "к Кристине", "к Олегу"]
NAMES = ["Ольга", "Мария", "Алексей", "Игорь", "Наталья", "Екатерина",
         "Сергей", "Анна", "Дмитрий", "Юлия", "Тимур", "Светлана"]
GREETINGS = ["Здравствуйте", "Добрый день", "Привет", "Добрый вечер",
             "Здравствуйте", "Доброе утро", "Приветствую", "Здрасте"]
EXTRAS = [
    "если есть время", "после работы", "это для сына", "ему 8 лет",
    "в прошлый раз делала у вас и очень понравилось",
    "волосы до лопаток", "надо успеть до 20:00", "можно без ожидания",
    "я у вас первый раз", "подруга посоветовала", "нас будет двое",
    "хочу покороче чем в прошлый раз", "если можно",
]
LONG_SENTENCES = [
    "Добрый день, подскажите пожалуйста, можно ли у вас записаться на "
    "окрашивание в пятницу ближе к вечеру и сколько примерно это будет стоить "
    "при длине до лопаток?",
    "Здравствуйте! Хочу записать сына на стрижку на субботу в первой половине "
    "дня, если есть свободное время у Артёма.",
    "Привет, есть ли сегодня окно на мужскую стрижку и бороду после 19:00?",
    "Здравствуйте, я записана на завтра на 15:00 на маникюр, но не успеваю, "
    "можно перенести на четверг в это же время?",
    "Добрый вечер, вы работаете в воскресенье? Хотела бы сделать укладку "
    "к 12 часам, у меня свадьба у подруги.",
    "Здравствуйте, сколько у вас стоит кератин на длинные волосы и сколько "
    "по времени занимает процедура?",
    "Добрый день, к сожалению не смогу прийти завтра, заболел ребёнок, "
    "отмените пожалуйста мою запись.",
]
FOLLOWUPS = [
    lambda r: ["да"],
    lambda r: ["да", "давайте " + r.choice(HOURS)],
    lambda r: ["а можно попозже"],
    lambda r: ["хорошо", "запишите"],
    lambda r: ["меня зовут " + r.choice(NAMES)],
    lambda r: [r.choice(NAMES)],
    lambda r: ["+7 9%02d %03d-%02d-%02d" % (r.randrange(100), r.randrange(1000),
                                           r.randrange(100), r.randrange(100))],
    lambda r: ["спасибо"],
    lambda r: ["спасибо", "до встречи"],
    lambda r: ["а сколько по времени", "займёт"],
    lambda r: ["а к кому", "можно"],
    lambda r: ["тогда", r.choice(HOURS)],
    lambda r: ["подходит"],
    lambda r: ["нет", "это рано", "а есть", r.choice(["после 17", "после обеда",
                                                       "вечером"])],
    lambda r: ["ок", "спасибо", "буду"],
    lambda r: ["а можно ещё", r.choice(SERVICES)[0]],
    lambda r: ["и ещё вопрос", "у вас есть парковка"],
    lambda r: ["а картой", "можно оплатить"],
    lambda r: ["а " + r.choice(WHEN), "никак?"],
    lambda r: ["понял", "спасибо"],
    lambda r: ["отлично"],
    lambda r: ["а кто из мастеров", "свободен"],
    lambda r: ["напомните", "пожалуйста", "адрес"],
]


def intent_phrases(r: random.Random, first: bool) -> tuple[list[str], bool]:
    """Return (phrases, is_question) for one request."""
    if not first and r.random() < 0.7:
        p = r.choice(FOLLOWUPS)(r)
        q = p[-1].startswith(("а ", "и ")) or p[0] in ("а сколько по времени",
                                                      "а к кому", "а картой",
                                                      "а кто из мастеров")
        return p, q
    svc_acc, svc_nom = r.choice(SERVICES)
    kind = r.choices(["book", "price", "avail", "resched", "cancel", "info"],
                     [45, 18, 14, 9, 5, 9])[0]
    if kind == "book":
        head = r.choice([["можно", "записаться"], ["хочу записаться"],
                         ["запишите меня"], ["можно записаться"],
                         ["подскажите", "можно записаться"]])
        p = head + [svc_acc, r.choice(WHEN)]
        if r.random() < 0.3:
            p.append(r.choice(MASTERS))
        if r.random() < 0.25:
            p.append(r.choice(EXTRAS))
        return p, head[0] != "запишите меня" and head[0] != "хочу записаться"
    if kind == "price":
        p = r.choice([["сколько стоит", svc_nom],
                      ["а сколько", "будет стоить", svc_nom],
                      ["подскажите", "цену", svc_acc.replace("на ", "на ", 1)],
                      ["какая цена", svc_acc]])
        if r.random() < 0.3:
            p.append(r.choice(["у вас", "у мастера", "на длинные волосы"]))
        return p, True
    if kind == "avail":
        p = r.choice([["есть свободное время", r.choice(WHEN)],
                      ["а " + r.choice(WHEN), "есть места"],
                      ["когда ближайшее окно", r.choice(MASTERS)],
                      ["есть окошко", r.choice(WHEN), svc_acc]])
        return p, True
    if kind == "resched":
        p = ["я записан" + r.choice(["", "а"]), r.choice(WHEN), r.choice(HOURS),
             "можно перенести", "на " + r.choice(["другой день", "попозже",
                                                 "пятницу", "следующую неделю"])]
        if r.random() < 0.4:
            p.append(r.choice(["а то не успеваю", "работа", "извините"]))
        return p, True
    if kind == "cancel":
        p = ["хочу отменить запись", r.choice(WHEN)]
        if r.random() < 0.6:
            p += r.choice([["извините", "заболел ребёнок"], ["планы поменялись"],
                           ["не получается прийти"]])
        return p, False
    p = r.choice([["вы до скольки работаете", "сегодня"],
                  ["а где вы находитесь"], ["у вас есть парковка"],
                  ["вы работаете", "в воскресенье"],
                  ["по картам", "можно оплатить"],
                  ["подскажите", "адрес"]])
    return p, p[0] != "подскажите"


@dataclass
class Style:
    capitalize: bool     # starts messages with a capital letter
    punct: bool          # ends questions with "?", greetings with "!"


def render(msgs: list[str], style: Style, question: bool) -> list[str]:
    out = []
    for i, m in enumerate(msgs):
        if style.capitalize and m:
            m = m[0].upper() + m[1:]
        if i == len(msgs) - 1 and style.punct and question and m[-1:] not in "?!.":
            m += "?"
        out.append(m)
    return out


def split_fragments(r: random.Random, phrases: list[str], k: int) -> list[str]:
    """Cut phrases into k contiguous fragments, preferring phrase boundaries."""
    units = list(phrases)
    # Not enough phrases: split the longest multi-word phrase at a word boundary.
    while len(units) < k:
        idx = max(range(len(units)), key=lambda i: len(units[i].split()))
        w = units[idx].split()
        if len(w) < 2:
            break
        cut = r.randrange(1, len(w))
        units[idx:idx + 1] = [" ".join(w[:cut]), " ".join(w[cut:])]
    k = min(k, len(units))
    cuts = sorted(r.sample(range(1, len(units)), k - 1)) if k > 1 else []
    out, prev = [], 0
    for c in cuts + [len(units)]:
        out.append(" ".join(units[prev:c]))
        prev = c
    return out


# --------------------------------------------------------------------------
# Timing / presence model
# --------------------------------------------------------------------------

@dataclass
class Client:
    speed: float            # chars per second while actually typing
    style: Style
    frag_mode: str          # "oneshot" | "normal" | "fragmenter"
    presence: bool
    greets_separately: bool


@dataclass
class Ev:
    at_ms: int
    seq: int
    kind: str
    text: str | None = None
    thought: int | None = None


@dataclass
class Conv:
    cid: str
    events: list = field(default_factory=list)


def choose_k(r: random.Random, mode: str, max_frag: int) -> int:
    if mode == "oneshot":
        k = 1 if r.random() < 0.85 else 2
    elif mode == "normal":
        k = r.choices([1, 2, 3, 4], [35, 35, 20, 10])[0]
    else:
        k = r.choices([2, 3, 4, 5, 6], [15, 30, 25, 18, 12])[0]
    return max(1, min(k, max_frag))


def gen_conversation(r: random.Random, a, cid: str, start_s: float) -> tuple[Conv, dict]:
    conv = Conv(cid)
    stats = {"requests": 0, "one_msg_requests": 0}
    # ---- client profile
    if r.random() < a.slow_share:
        speed = r.uniform(a.slow_speed_min, a.slow_speed_max)
    else:
        speed = r.uniform(a.speed_min, a.speed_max)
    style = Style(capitalize=r.random() < 0.45, punct=r.random() < 0.5)
    mode = r.choices(["oneshot", "normal", "fragmenter"],
                     [a.oneshot_share, 1 - a.oneshot_share - a.fragmenter_share,
                      a.fragmenter_share])[0]
    cl = Client(speed, style, mode, r.random() < a.presence_share,
                r.random() < a.greet_share)
    n_req = r.choices(range(1, 6), [35, 28, 18, 11, 8])[0]
    n_req = min(n_req, a.max_requests)

    seq = [0]

    def emit(t_s: float, kind: str, text=None, thought=None):
        seq[0] += 1
        conv.events.append(Ev(0, seq[0], kind, text, thought))
        conv.events[-1]._send = t_s  # type: ignore[attr-defined]

    def presence(t_s: float, kind: str):
        if not cl.presence:
            return
        if kind == "paused" and r.random() < a.paused_loss:
            return
        if kind == "typing" and r.random() < a.typing_loss:
            return
        emit(t_s, kind)

    def compose(t0: float, dur: float) -> None:
        """typing at t0, refreshed every ~refresh s while composing continues."""
        presence(t0, "typing")
        t = t0 + r.uniform(a.refresh_min, a.refresh_max)
        while t < t0 + dur:
            presence(t, "typing")
            t += r.uniform(a.refresh_min, a.refresh_max)

    def type_fragment(t: float, text: str) -> float:
        """Client types `text` starting at t; returns the send time."""
        dur = max(a.min_type_s, len(text) / cl.speed * r.lognormvariate(0, a.type_sigma))
        if len(text) >= 12 and r.random() < a.midstop_share:
            # stops mid-fragment (distracted / checking calendar), then resumes
            part = dur * r.uniform(0.2, 0.8)
            compose(t, part)
            presence(t + part, "paused")
            t = t + part + r.uniform(a.midstop_min, a.midstop_max)
            dur -= part
        compose(t, dur)
        send = t + dur
        presence(send - r.uniform(0, a.paused_lead_ms) / 1000.0, "paused")
        return send

    def think() -> float:
        if r.random() < a.tail_share:
            return r.uniform(a.tail_min, a.tail_max)
        return r.uniform(a.think_min, a.think_max)

    t = start_s
    for q in range(n_req):
        stats["requests"] += 1
        first = q == 0
        msgs: list[str] = []
        voice_len = None
        if first and r.random() < a.longsentence_share:
            msgs = [r.choice(LONG_SENTENCES)]
        else:
            phrases, isq = intent_phrases(r, first)
            greet = None
            if first and r.random() < 0.75:
                greet = r.choice(GREETINGS)
            k = choose_k(r, cl.frag_mode, a.max_fragments)
            if greet and cl.greets_separately and k < a.max_fragments:
                # "Здравствуйте!" as its own complete message, then the request
                body = split_fragments(r, phrases, max(1, k - 1))
                msgs = [greet + ("!" if style.punct else "")] + body
            else:
                if greet:
                    phrases = [greet + ("," if style.punct else "")] + phrases
                msgs = split_fragments(r, phrases, k)
            msgs = render(msgs, style, isq)
            msgs = [m for m in msgs if m]
            if r.random() < a.voice_share:
                # request spoken as a voice note (maybe after a typed greeting)
                voice_len = max(2.0, sum(len(m) for m in msgs) / 12.0 + r.uniform(1, 6))
                msgs = ([msgs[0]] if greet and cl.greets_separately and len(msgs) > 1 else []) \
                    + ["[голосовое сообщение]"]
        if len(msgs) == 1:
            stats["one_msg_requests"] += 1
        for i, m in enumerate(msgs):
            if i > 0:
                t += think()
            if m == "[голосовое сообщение]" and voice_len is not None:
                compose(t, voice_len)  # recording chat state -> reported as typing
                t += voice_len
                presence(t - r.uniform(0, a.paused_lead_ms) / 1000.0, "paused")
            else:
                t = type_fragment(t, m)
            emit(t, "message", m, q)
        if q + 1 < n_req:
            # bot answers, client reads, thinks; next request starts >= gap_min
            gap = a.gap_min + min(a.gap_max, r.lognormvariate(math.log(a.gap_median), a.gap_sigma))
            if r.random() < a.abandon_share:
                # starts typing, deletes it, no message
                ta = t + a.gap_min * r.uniform(0.3, 0.9)
                d = r.uniform(1, 6)
                compose(ta, d)
                presence(ta + d, "paused")
                gap = max(gap, ta + d + 2 - t)
            t += gap
    # ---- delivery: webhook arrival = send + network/gateway delay
    last_msg = -1
    for ev in conv.events:
        s = ev._send  # type: ignore[attr-defined]
        if ev.kind == "message":
            at = int(round(s * 1000 + r.uniform(a.msg_delay_min, a.msg_delay_max)))
            at = max(at, last_msg + 1)  # messages of a chat arrive in order
            last_msg = at
        else:
            at = int(round(s * 1000 + r.uniform(a.presence_delay_min, a.presence_delay_max)))
        ev.at_ms = max(0, at)
    return conv, stats


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(math.ceil(p / 100 * len(xs))) - 1))
    return xs[i]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    A = ap.add_argument
    A("--out", required=True, help="output .jsonl.gz path")
    A("--seed", type=int, default=0, help="RNG seed")
    A("--conversations", type=int, default=2000, help="number of conversations")
    A("--span-s", type=float, default=7200, help="conversation starts uniform over [0, span)")
    A("--presence-share", type=float, default=0.5, help="share of conversations whose gateway reports chat state")
    A("--max-requests", type=int, default=5, help="cap on requests per conversation (1-5 drawn)")
    A("--max-fragments", type=int, default=6, help="cap on fragments per request")
    A("--oneshot-share", type=float, default=0.30, help="clients who write each request as one message")
    A("--fragmenter-share", type=float, default=0.35, help="clients who split requests into 2-6 fragments")
    A("--greet-share", type=float, default=0.45, help="clients who send the greeting as its own message")
    A("--longsentence-share", type=float, default=0.12, help="first requests written as one long sentence")
    A("--voice-share", type=float, default=0.03, help="requests sent as a voice note")
    A("--speed-min", type=float, default=2.0, help="typing speed, chars/s (normal clients)")
    A("--speed-max", type=float, default=6.0, help="upper bound of normal typing speed")
    A("--slow-share", type=float, default=0.15, help="share of slow typists")
    A("--slow-speed-min", type=float, default=0.8, help="slow typists' speed range, chars/s")
    A("--slow-speed-max", type=float, default=2.0, help="upper bound of slow speed")
    A("--type-sigma", type=float, default=0.3, help="lognormal jitter of one fragment's typing time")
    A("--min-type-s", type=float, default=0.4, help="minimum composing time of a fragment")
    A("--think-min", type=float, default=0.3, help="pause before a follow-up fragment, s")
    A("--think-max", type=float, default=6.0, help="upper bound of the uniform think pause")
    A("--tail-share", type=float, default=0.06, help="share of fragment pauses from the heavy tail")
    A("--tail-min", type=float, default=10.0, help="heavy-tail pause (checking calendar), s")
    A("--tail-max", type=float, default=25.0, help="upper bound of heavy-tail pause")
    A("--midstop-share", type=float, default=0.08, help="fragments (>=12 chars) where typing stops mid-way")
    A("--midstop-min", type=float, default=2.0, help="mid-fragment stop duration, s")
    A("--midstop-max", type=float, default=15.0, help="upper bound of mid-fragment stop")
    A("--refresh-min", type=float, default=7.0, help="composing refresh interval, s")
    A("--refresh-max", type=float, default=13.0, help="upper bound of refresh interval")
    A("--paused-loss", type=float, default=0.10, help="probability a paused chat state is lost/not sent")
    A("--typing-loss", type=float, default=0.02, help="probability a typing chat state is lost")
    A("--paused-lead-ms", type=float, default=250, help="paused is emitted 0..this ms before the send")
    A("--gap-min", type=float, default=20.0, help="min gap between requests (bot reply + reading), s")
    A("--gap-median", type=float, default=40.0, help="median of lognormal part added to gap-min, s")
    A("--gap-sigma", type=float, default=0.9, help="lognormal sigma of the inter-request gap")
    A("--gap-max", type=float, default=1800.0, help="cap of lognormal part, s")
    A("--abandon-share", type=float, default=0.05, help="inter-request gaps with typing that is abandoned")
    A("--msg-delay-min", type=float, default=100, help="send -> webhook delay of messages, ms")
    A("--msg-delay-max", type=float, default=800, help="upper bound of message delay, ms")
    A("--presence-delay-min", type=float, default=50, help="delay of presence events, ms")
    A("--presence-delay-max", type=float, default=900, help="upper bound of presence delay, ms")
    a = ap.parse_args(argv)

    r = random.Random(a.seed)
    rows = []
    tot = {"requests": 0, "one_msg_requests": 0}
    gaps = []
    n_msg = n_typ = n_pau = 0
    width = max(5, len(str(a.conversations)))
    for c in range(a.conversations):
        cid = f"ind-{c:0{width}d}"
        conv, st = gen_conversation(r, a, cid, r.uniform(0, a.span_s))
        for k in tot:
            tot[k] += st[k]
        prev = {}
        for ev in conv.events:
            if ev.kind == "message":
                n_msg += 1
                if ev.thought in prev:
                    gaps.append((ev.at_ms - prev[ev.thought]) / 1000.0)
                prev[ev.thought] = ev.at_ms
                rows.append((ev.at_ms, cid, ev.seq, {"conv": cid, "at_ms": ev.at_ms,
                             "kind": "message", "text": ev.text, "thought": ev.thought}))
            else:
                n_typ += ev.kind == "typing"
                n_pau += ev.kind == "paused"
                rows.append((ev.at_ms, cid, ev.seq, {"conv": cid, "at_ms": ev.at_ms, "kind": ev.kind}))
    rows.sort(key=lambda x: (x[0], x[1], x[2]))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz:
        for *_, obj in rows:
            gz.write((json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode())
    with open(a.out, "wb") as f:
        f.write(buf.getvalue())
    print(f"{a.out}: {len(buf.getvalue())/1024:.0f} KiB gzip")
    print(f"  conversations {a.conversations}, requests {tot['requests']}, messages {n_msg}, "
          f"presence events {n_typ + n_pau} (typing {n_typ}, paused {n_pau})")
    print(f"  within-request gaps between consecutive messages (s): n={len(gaps)} "
          f"p50={pct(gaps, 50):.2f} p90={pct(gaps, 90):.2f} p99={pct(gaps, 99):.2f}")
    print(f"  requests with one message: {tot['one_msg_requests'] / max(1, tot['requests']):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
