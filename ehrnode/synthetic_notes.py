"""Synthetic clinical notes, English and Chinese, with identifiers planted in varied forms.

For measuring the notes scrubber (``benchmarks/deid_quality.py`` and its test): each note
comes with the Patient resource it belongs to and the exact span and kind of every
identifier planted in it, so recall and precision are counted against known truth. Seeded
and offline.

What is planted, in the forms notes really use: the patient's name (in full, reversed with
a comma, initial and surname, upper or lower case, with a title; a Chinese name as written,
in pinyin either order, with a title), a relative's name, phone numbers (North American and
mainland, mobile and landline, with every usual separator), SSNs and resident ids (with or
without spaces), medical record numbers with English and Chinese labels, street addresses
with city and ZIP, Chinese addresses, e-mail addresses, URLs, dates in English and Chinese
forms, ages over 89 ("95-year-old", "Age: 95", "九十二岁"), and other people's names (Dr.
Smith, Nurse Patel, a given name and surname, 李医生, 王小明护士, 家属张丽). Between them
sits clinical text with numbers that are not identifiers (doses, vital signs, lab values).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from .empi.identifiers import resident_id_check_char

_EN_GIVEN = ["Olivia", "Liam", "Emma", "Noah", "Amelia", "Mateo", "Sophia", "Elijah", "Isabella", "Lucas", "Mia",
             "Ethan", "Harper", "Jonah", "Layla", "Gladys", "Harold", "Dolores", "Marcus", "Yvonne", "Terrence",
             "Beatrice", "Wendell", "Rosalind", "Cornelius", "Priya", "Tomasz", "Ingrid", "Rafael", "Keisha"]
_EN_FAMILY = ["Okafor", "Lindqvist", "Hernandez", "Whitfield", "Nakamura", "Brennan", "Castellano", "Abernathy",
              "Kowalczyk", "Delacroix", "Fairbanks", "Montgomery", "Schumm", "Medhurst", "Vonrueden", "Cummerata",
              "Pfannerstill", "Oberbrunner", "Gutkowski", "Schamberger", "Rutherford", "Kilback", "Okuneva"]
_OTHERS_EN = [("Dr.", "Smith"), ("Dr.", "Alvarez"), ("Nurse", "Patel"), ("Dr.", "Chen"), ("Mrs.", "Greenberg"),
              ("Dr.", "O'Connor"), ("Prof.", "Nguyen"), ("Mr.", "Johansson")]
_OTHER_PAIRS = [("Michael", "Brown"), ("Jennifer", "Wilson"), ("David", "Martinez"), ("Susan", "Anderson"),
                ("Robert", "Taylor"), ("Linda", "Thomas"), ("James", "Moore"), ("Patricia", "Jackson")]
_CN_FAMILY = ["王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴", "徐", "孙", "马", "朱", "胡", "郭", "林",
              "何",
              "罗", "郑", "梁", "谢", "宋", "唐", "韩", "冯", "邓", "曹", "彭", "曾", "欧阳", "司马"]
_CN_GIVEN = ["伟", "芳", "娜", "秀英", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "小明", "建国",
             "晓燕", "志强", "海峰", "丽娟", "子涵", "浩然", "雨桐", "思远"]
_CN_TITLES = ["医生", "护士", "主任", "大夫", "教授"]
_CN_LABELS = ["家属", "联系人", "父亲", "母亲", "女儿", "儿子", "配偶"]
_US_PLACES = [("Boston", "MA", "02118"), ("Worcester", "MA", "01608"), ("Springfield", "IL", "62704"),
              ("Hartford", "CT", "06103"), ("Providence", "RI", "02903"), ("Emporia", "KS", "66801")]
_STREETS = [("Maple", "Street"), ("Harbor", "Avenue"), ("Chestnut", "Road"), ("Beacon", "Lane"), ("Elm", "Drive"),
            ("Summit", "Court"), ("Orchard", "Way"), ("Abernathy", "Landing"), ("Willow", "Boulevard")]
_STREET_ABBR = {"Street": "St.", "Avenue": "Ave", "Road": "Rd", "Lane": "Ln", "Drive": "Dr.", "Court": "Ct",
                "Way": "Way", "Landing": "Landing", "Boulevard": "Blvd"}
_CN_ADDRESSES = ["广东省广州市天河区体育西路{n}号", "北京市朝阳区建国路{n}号", "上海市浦东新区世纪大道{n}号",
                 "浙江省杭州市西湖区文三路{n}号{r}室", "四川省成都市武侯区人民南路{n}号"]
_EN_FILLER = [
    "Patient reports chest pain radiating to the left arm for 2 days.", "BP 130/85, HR 72, temperature 37.2 C.",
    "Started metformin 500 mg twice daily.", "Hemoglobin A1c 7.8% on the last panel.",
    "Follow up in 3 months with repeat labs.", "No known drug allergies.", "Lungs clear to auscultation bilaterally.",
    "Denies fever, chills or weight loss.", "Continue lisinopril 10 mg daily and atorvastatin 40 mg at night.",
    "Creatinine 1.1 mg/dL, potassium 4.2 mmol/L.", "Plan: chest X-ray and ECG today.",
    "The patient was counselled on smoking cessation.", "Wound healing well, sutures removed.",
    "Pain score 3 of 10 after ibuprofen 400 mg.", "Discussed diet and exercise; walks 30 minutes a day.",
]
_CN_FILLER = ["患者诉胸闷气短三天。", "血压130/85mmHg，心率72次/分。", "予阿司匹林100mg口服，每日一次。",
              "双肺呼吸音清。",
              "空腹血糖7.8mmol/L。", "嘱低盐低脂饮食，三个月后复查。", "否认药物过敏史。", "伤口愈合良好，已拆线。",
              "查体：神清，精神可。", "继续二甲双胍0.5g每日两次。"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_CN_DIGITS = "〇一二三四五六七八九"
_PINYIN = {"王": "Wang", "李": "Li", "张": "Zhang", "刘": "Liu", "陈": "Chen", "杨": "Yang", "赵": "Zhao",
           "黄": "Huang",
           "周": "Zhou", "吴": "Wu", "徐": "Xu", "孙": "Sun", "马": "Ma", "朱": "Zhu", "胡": "Hu", "郭": "Guo",
           "林": "Lin", "何": "He", "罗": "Luo", "郑": "Zheng", "梁": "Liang", "谢": "Xie", "宋": "Song", "唐": "Tang",
           "韩": "Han", "冯": "Feng", "邓": "Deng", "曹": "Cao", "彭": "Peng", "曾": "Zeng", "欧阳": "Ouyang",
           "司马": "Sima", "伟": "Wei", "芳": "Fang", "娜": "Na", "秀英": "Xiuying", "敏": "Min", "静": "Jing",
           "丽": "Li", "强": "Qiang", "磊": "Lei", "军": "Jun", "洋": "Yang", "勇": "Yong", "艳": "Yan", "杰": "Jie",
           "娟": "Juan", "小明": "Xiaoming", "建国": "Jianguo", "晓燕": "Xiaoyan", "志强": "Zhiqiang",
           "海峰": "Haifeng", "丽娟": "Lijuan", "子涵": "Zihan", "浩然": "Haoran", "雨桐": "Yutong", "思远": "Siyuan"}


@dataclass(frozen=True)
class Planted:
    kind: str  # name, address, phone, id, email, url, date, age
    start: int
    end: int


@dataclass
class Note:
    text: str
    patient: dict[str, Any]
    planted: list[Planted] = field(default_factory=list)
    language: str = "en"


class _Writer:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.length = 0
        self.planted: list[Planted] = []

    def text(self, value: str) -> None:
        self.parts.append(value)
        self.length += len(value)

    def plant(self, kind: str, value: str) -> None:
        self.planted.append(Planted(kind, self.length, self.length + len(value)))
        self.text(value)


def notes(count: int, seed: int = 0) -> list[Note]:
    """``count`` notes, alternating English and Chinese, each of a patient of its own."""
    rng = random.Random(seed)
    return [(_english if i % 2 == 0 else _chinese)(rng, i) for i in range(count)]


def _date_between(rng: random.Random, start: int, end: int) -> date:
    first = date(start, 1, 1)
    return first + timedelta(days=rng.randrange((date(end, 12, 31) - first).days))


def _english_date(rng: random.Random, day: date) -> str:
    month = _MONTHS[day.month - 1]
    return rng.choice([
        day.isoformat(), f"{day.month}/{day.day}/{day.year}", f"{day.month:02d}/{day.day:02d}/{day.year}",
        f"{month} {day.day}, {day.year}", f"{day.day} {month} {day.year}", f"{month[:3]} {day.day}, {day.year}",
        f"{day.day} {month[:3]} {day.year}", f"{month} {day.year}", f"{day.month}/{day.day}/{day.year % 100:02d}",
    ])


def _chinese_date(rng: random.Random, day: date) -> str:
    def small(n: int) -> str:
        tens, units = divmod(n, 10)
        head = "" if tens == 0 else ("十" if tens == 1 else "一二三"[tens - 1] + "十")
        return head + ("" if units == 0 else "一二三四五六七八九"[units - 1])

    return rng.choice([
        f"{day.year}年{day.month}月{day.day}日", f"{day.month}月{day.day}日", f"{day.year}年{day.month}月",
        "".join(_CN_DIGITS[int(d)] for d in str(day.year)) + f"年{small(day.month)}月{small(day.day)}日",
        f"{day.year}-{day.month:02d}-{day.day:02d}",
    ])


def _us_phone(rng: random.Random) -> tuple[str, list[str]]:
    area, mid, last = rng.randrange(201, 989), rng.randrange(200, 999), rng.randrange(1000, 9999)
    digits = f"{area}{mid}{last}"
    forms = [f"({area}) {mid}-{last}", f"{area}-{mid}-{last}", f"{area}.{mid}.{last}", digits,
             f"+1 {area} {mid} {last}", f"{mid}-{last}"]
    return digits, forms


def _cn_phone(rng: random.Random) -> tuple[str, list[str]]:
    digits = f"1{rng.choice('3456789')}{rng.randrange(10 ** 8, 10 ** 9)}"
    a, b, c = digits[:3], digits[3:7], digits[7:]
    return digits, [digits, f"{a} {b} {c}", f"{a}-{b}-{c}", f"+86 {a} {b} {c}"]


def _resident_id(rng: random.Random, born: date) -> str:
    body = f"{rng.choice(['110105', '310115', '440106', '510107'])}{born:%Y%m%d}{rng.randrange(100, 999)}"
    return body + resident_id_check_char(body)


def _english(rng: random.Random, key: int) -> Note:
    given, family = rng.choice(_EN_GIVEN), rng.choice(_EN_FAMILY)
    relative = (rng.choice(_EN_GIVEN), rng.choice(_EN_FAMILY))
    born = _date_between(rng, 1925, 2010)
    digits, phone_forms = _us_phone(rng)
    ssn = f"{rng.randrange(100, 899)}-{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}"
    mrn = f"{rng.randrange(10 ** 7, 10 ** 8)}"
    number, (street, kind) = rng.randrange(1, 9999), rng.choice(_STREETS)
    city, state, zip_code = rng.choice(_US_PLACES)
    email = f"{given.lower()}.{family.lower()}@example.com"
    patient = {
        "resourceType": "Patient", "id": f"gen-{key}", "birthDate": born.isoformat(),
        "name": [{"use": "official", "family": family, "given": [given]}],
        "telecom": [{"system": "phone", "value": phone_forms[1]}, {"system": "email", "value": email}],
        "address": [{"line": [f"{number} {street} {kind}"], "city": city, "state": state, "postalCode": zip_code,
                     "country": "US"}],
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn},
                       {"system": "http://hospital.example.org/mrn", "value": mrn}],
        "contact": [{"name": {"family": relative[1], "given": [relative[0]]}}],
    }
    w = _Writer()
    visit = _date_between(rng, 2015, 2024)
    w.plant("date", _english_date(rng, visit))
    w.text("\n\n# History of Present Illness\n")
    w.plant("name", rng.choice([f"{given} {family}", f"{family.upper()}, {given}", f"{given[0]}. {family}",
                                f"{given.lower()} {family.lower()}", f"{family}, {given}"]))
    age = (visit - born).days // 365
    if age >= 90:
        w.text(" is a ")
        w.plant("age", str(age))
        w.text(rng.choice(["-year-old", " year-old", " y.o.", " years old"]))
        w.text(" patient. ")
    else:
        w.text(f" is a {age} year-old patient. ")
    for _ in range(rng.randrange(2, 5)):
        w.text(rng.choice(_EN_FILLER) + " ")
    w.text("Seen with ")
    title, name = rng.choice(_OTHERS_EN)
    w.plant("name", f"{title} {name}")
    w.text(" on ")
    w.plant("date", _english_date(rng, visit + timedelta(days=rng.randrange(1, 60))))
    w.text(". ")
    if rng.random() < 0.6:
        w.text("Also present: ")
        first, last = rng.choice(_OTHER_PAIRS)
        w.plant("name", f"{first} {last}")
        w.text(". ")
    w.text("Contact: ")
    w.plant("phone", rng.choice(phone_forms))
    w.text(", or the patient's ")
    w.text(rng.choice(["daughter ", "son ", "wife ", "husband "]))
    w.plant("name", f"{relative[0]} {relative[1]}")
    w.text(". Lives at ")
    w.plant("address", rng.choice([f"{number} {street} {kind}", f"{number} {street} {_STREET_ABBR[kind]}"]))
    w.text(", ")
    w.plant("address", city)
    w.text(f", {state} ")
    w.plant("address", zip_code)
    w.text(". ")
    choice = rng.randrange(4)
    if choice == 0:
        w.text("SSN ")
        w.plant("id", rng.choice([ssn, ssn.replace("-", " ")]))
    elif choice == 1:
        w.text("MRN: ")
        w.plant("id", mrn)
    elif choice == 2:
        w.text("E-mail ")
        w.plant("email", email)
    else:
        w.text("Portal: ")
        w.plant("url", f"https://portal.example.org/patients/{mrn}")
    w.text(". ")
    if rng.random() < 0.5:
        w.text(rng.choice(_EN_FILLER) + " Next visit ")
        w.plant("date", _english_date(rng, visit + timedelta(days=rng.randrange(60, 200))))
        w.text(".")
    if rng.random() < 0.3:
        w.text(" Initials on the consent form: ")
        w.plant("name", f"{given[0]}.{family[0]}.")
        w.text(".")
    return Note("".join(w.parts), patient, w.planted, "en")


def _chinese(rng: random.Random, key: int) -> Note:
    family, given = rng.choice(_CN_FAMILY), rng.choice(_CN_GIVEN)
    relative = (rng.choice(_CN_FAMILY), rng.choice([g for g in _CN_GIVEN if len(g) == 2]))
    born = _date_between(rng, 1925, 2010)
    digits, phone_forms = _cn_phone(rng)
    landline = f"0{rng.choice(['10', '21', '20', '755', '28'])}"
    landline_number = f"{rng.randrange(2000, 9999)}{rng.randrange(1000, 9999)}"
    landline_forms = [f"{landline}-{landline_number}", f"{landline} {landline_number[:4]} {landline_number[4:]}",
                      f"({landline}){landline_number}"]
    resident = _resident_id(rng, born)
    mrn = f"{rng.choice('ABZ')}{rng.randrange(10 ** 6, 10 ** 7)}"
    address = rng.choice(_CN_ADDRESSES).format(n=rng.randrange(1, 999), r=rng.randrange(101, 2999))
    patient = {
        "resourceType": "Patient", "id": f"gen-{key}", "birthDate": born.isoformat(),
        "name": [{"use": "official", "family": family, "given": [given], "text": family + given}],
        "telecom": [{"system": "phone", "value": phone_forms[0]}],
        "address": [{"line": [address], "country": "CN"}],
        "identifier": [{"system": "urn:oid:1.2.156.112604.1.2.1", "value": resident},
                       {"system": "http://hospital.example.cn/mrn", "value": mrn}],
        "contact": [{"name": {"family": relative[0], "given": [relative[1]], "text": relative[0] + relative[1]}}],
    }
    w = _Writer()
    visit = _date_between(rng, 2015, 2024)
    w.text("入院日期：")
    w.plant("date", _chinese_date(rng, visit))
    w.text("\n患者")
    pinyin_family, pinyin_given = _PINYIN[family], _PINYIN[given]
    w.plant("name", rng.choice([family + given, f"{pinyin_family} {pinyin_given}", f"{pinyin_given} {pinyin_family}",
                                f"{pinyin_family.upper()} {pinyin_given}", f"{pinyin_family}{pinyin_given.lower()}"]))
    age = (visit - born).days // 365
    if age >= 90:
        w.text("，")
        w.plant("age", rng.choice([str(age), _cn_age(age)]))
        w.text(rng.choice(["岁", "周岁"]))
        w.text("，")
    else:
        w.text(f"，{age}岁，")
    for _ in range(rng.randrange(2, 5)):
        w.text(rng.choice(_CN_FILLER))
    w.text("由")
    w.plant("name", rng.choice(_CN_FAMILY) + rng.choice(["", rng.choice(_CN_GIVEN)]))
    w.text(rng.choice(_CN_TITLES) + "查看，")
    w.plant("date", _chinese_date(rng, visit + timedelta(days=rng.randrange(1, 60))))
    w.text("复诊。")
    w.text(rng.choice(_CN_LABELS) + "：")
    w.plant("name", relative[0] + relative[1])
    w.text("，电话")
    w.plant("phone", rng.choice(phone_forms))
    w.text("，座机")
    w.plant("phone", rng.choice(landline_forms))
    w.text("。住址：")
    w.plant("address", address)
    w.text("。")
    if rng.random() < 0.5:
        w.text("身份证号")
        spaced = f"{resident[:6]} {resident[6:14]} {resident[14:]}"
        w.plant("id", rng.choice([resident, spaced]))
    else:
        w.text("病历号：")
        w.plant("id", mrn)
    w.text("。")
    if rng.random() < 0.5:
        w.text(rng.choice(_CN_FILLER) + "下次复诊")
        w.plant("date", _chinese_date(rng, visit + timedelta(days=rng.randrange(60, 200))))
        w.text("。")
    return Note("".join(w.parts), patient, w.planted, "zh")


def _cn_age(age: int) -> str:
    tens, units = divmod(age, 10)
    if age < 100:
        return "一二三四五六七八九"[tens - 1] + "十" + ("" if units == 0 else "一二三四五六七八九"[units - 1])
    rest = age - 100
    if rest == 0:
        return "一百"
    if rest < 10:
        return "一百零" + "一二三四五六七八九"[rest - 1]
    if rest >= 20:
        return "一百" + _cn_age(rest)
    return "一百一十" + ("" if rest == 10 else "一二三四五六七八九"[rest - 11])
