//! A realistic booking context, as the assistant's cache holds it: a salon
//! with 50 services and 20 staff, 14 days of time slots for each master, and
//! a client with a visit history. About 300 KB of JSON, deterministic.

use serde_json::{json, Value};

/// xorshift: deterministic, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

const CATEGORIES: &[&str] =
    &["Стрижки", "Окрашивание", "Укладки", "Маникюр", "Педикюр", "Брови и ресницы", "Уход"];
const SERVICES: &[&str] = &[
    "Стрижка женская",
    "Стрижка мужская",
    "Стрижка детская",
    "Окрашивание в один тон",
    "Мелирование",
    "Балаяж",
    "Тонирование",
    "Укладка феном",
    "Вечерняя причёска",
    "Маникюр с покрытием гель-лак",
    "Маникюр классический",
    "Педикюр аппаратный",
    "Коррекция бровей",
    "Ламинирование ресниц",
    "Уход для волос",
    "Бритьё опасной бритвой",
    "Моделирование бороды",
];
const FIRST: &[&str] =
    &["Анна", "Мария", "Екатерина", "Ольга", "Дмитрий", "Алексей", "Светлана", "Ирина", "Наталья", "Сергей"];
const LAST: &[&str] =
    &["Иванова", "Смирнова", "Кузнецова", "Попова", "Соколов", "Лебедев", "Козлова", "Новикова"];
const ROLES: &[&str] = &["Топ-стилист", "Стилист", "Мастер маникюра", "Колорист", "Барбер", "Бровист"];

/// The ~300 KB context. `seed` varies the free/busy pattern, not the size.
pub fn booking_context(seed: u64) -> Value {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
    let services: Vec<Value> = (0..50)
        .map(|i| {
            let price = 800 + rng.below(60) * 100;
            json!({
                "id": 10_000 + i,
                "title": format!("{} {}", rng.pick(SERVICES), i + 1),
                "category": rng.pick(CATEGORIES),
                "price_min": price,
                "price_max": price + rng.below(20) * 100,
                "duration_min": 30 + rng.below(6) * 15,
                "description": "Консультация мастера, подбор ухода и стайлинг входят в стоимость услуги.",
                "staff_ids": (0..8).map(|_| 500 + rng.below(20)).collect::<Vec<_>>(),
                "online_booking": true,
            })
        })
        .collect();
    let staff: Vec<Value> = (0..20)
        .map(|i| {
            json!({
                "id": 500 + i,
                "name": format!("{} {}", rng.pick(FIRST), rng.pick(LAST)),
                "specialization": rng.pick(ROLES),
                "rating": 4.0 + rng.below(10) as f64 / 10.0,
                "avatar": format!("https://cdn.example.invalid/staff/{}.jpg", 500 + i),
                "bio": "Опыт работы более пяти лет, регулярно проходит обучение и повышение квалификации.",
                "service_ids": (0..15).map(|_| 10_000 + rng.below(50)).collect::<Vec<_>>(),
            })
        })
        .collect();
    let mut schedule = Vec::new();
    for day in 0..14 {
        for master in 0..20 {
            let slots: Vec<Value> = (0..18)
                .map(|s| {
                    json!({
                        "time": format!("{:02}:{:02}", 10 + s / 2, (s % 2) * 30),
                        "free": rng.below(3) != 0,
                        "seance_length": 1800,
                    })
                })
                .collect();
            schedule.push(
                json!({"date": format!("2026-12-{:02}", day + 1), "staff_id": 500 + master, "slots": slots}),
            );
        }
    }
    let visits: Vec<Value> = (0..40)
        .map(|v| {
            json!({
                "date": format!("2026-{:02}-{:02}", 1 + v % 11, 1 + v % 27),
                "service_id": 10_000 + rng.below(50),
                "staff_id": 500 + rng.below(20),
                "price": 1000 + rng.below(50) * 100,
                "status": if rng.below(10) == 0 { "cancelled" } else { "completed" },
                "comment": "Клиент просил не опаздывать и напомнить за день до визита.",
            })
        })
        .collect();
    json!({
        "company": {
            "id": 962302,
            "title": "Салон красоты «Лотос»",
            "address": "Москва, ул. Тверская, д. 12, стр. 1",
            "phone": "+7 495 000-00-00",
            "timezone": "Europe/Moscow",
            "working_hours": "ежедневно 10:00–21:00",
        },
        "services": services,
        "staff": staff,
        "schedule": schedule,
        "client": {
            "id": 7_001_234,
            "name": "Анна Смирнова",
            "phone": "79001234567",
            "email": "anna@example.invalid",
            "visits": visits,
            "loyalty": {"card": "GOLD", "discount_percent": 10, "bonus_points": 1250},
        },
    })
}

/// A small dialogue context: what most conversations carry.
pub fn small_dialogue(i: u64) -> Value {
    json!({
        "turns": i % 7,
        "state": "choosing_time",
        "service_id": 10_000 + i % 50,
        "staff_id": 500 + i % 20,
        "history": [
            {"role": "user", "text": "Привет, можно записаться на стрижку завтра?"},
            {"role": "assistant", "text": "Здравствуйте! Есть окна в 12:00 и 15:30."},
        ],
    })
}
