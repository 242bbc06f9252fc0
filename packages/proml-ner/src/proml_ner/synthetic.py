"""Synthetic few-shot NER data: real-looking sentences from templates and entity lists.

Eight coarse types with 34 fine types named as in Few-NERD (``person-athlete``, ``location-GPE``...), and
the INTRA split of Ding et al. (2021, Sec. 4.1): the fine types of *person, art, product, other* are for
training, *building, event* for development, *organization, location* for testing, so test types are
never seen in training. As in Few-NERD, entities of types outside a split are labelled ``O`` there.

These sentences are synthetic: numbers measured on them show that the code learns and ranks methods on
an unseen label set; they are not Few-NERD results.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from .formats import Sentence
from .words import split_words

__all__ = ["ENTITIES", "SPLITS", "TEMPLATES", "synthetic_corpus", "synthetic_episodes"]

ENTITIES: dict[str, list[str]] = {
    # person
    "person-artist/author": [
        "Toni Morrison",
        "Haruki Murakami",
        "Chinua Achebe",
        "Virginia Woolf",
        "Gabriel Garcia Marquez",
        "Margaret Atwood",
        "Leo Tolstoy",
        "Zadie Smith",
    ],
    "person-athlete": [
        "Serena Williams",
        "Lionel Messi",
        "Usain Bolt",
        "Simone Biles",
        "Roger Federer",
        "Eliud Kipchoge",
        "Megan Rapinoe",
        "Virat Kohli",
    ],
    "person-politician": [
        "Angela Merkel",
        "Nelson Mandela",
        "Jacinda Ardern",
        "Barack Obama",
        "Emmanuel Macron",
        "Indira Gandhi",
        "Winston Churchill",
        "Lula da Silva",
    ],
    "person-scholar": [
        "Marie Curie",
        "Noam Chomsky",
        "Alan Turing",
        "Richard Feynman",
        "Ada Lovelace",
        "Carl Sagan",
        "Jane Goodall",
        "Srinivasa Ramanujan",
    ],
    # art
    "art-film": [
        "Casablanca",
        "Parasite",
        "The Godfather",
        "Spirited Away",
        "Citizen Kane",
        "Amelie",
        "Black Panther",
        "Roma",
    ],
    "art-music": [
        "Bohemian Rhapsody",
        "Thriller",
        "Abbey Road",
        "Purple Rain",
        "Kind of Blue",
        "Rumours",
        "Lemonade",
        "Hey Jude",
    ],
    "art-writtenart": [
        "Beloved",
        "Things Fall Apart",
        "War and Peace",
        "Moby Dick",
        "Pride and Prejudice",
        "The Odyssey",
        "Don Quixote",
        "Middlemarch",
    ],
    "art-painting": [
        "Mona Lisa",
        "The Starry Night",
        "Guernica",
        "The Scream",
        "Water Lilies",
        "The Night Watch",
        "Las Meninas",
        "American Gothic",
    ],
    # product
    "product-car": [
        "Toyota Corolla",
        "Ford Mustang",
        "Tesla Model 3",
        "Volkswagen Golf",
        "Honda Civic",
        "Porsche 911",
        "Fiat Panda",
        "Jeep Wrangler",
    ],
    "product-software": [
        "Linux",
        "Photoshop",
        "Firefox",
        "Excel",
        "WordPress",
        "Android",
        "Blender",
        "PostgreSQL",
    ],
    "product-food": [
        "Nutella",
        "Coca-Cola",
        "Oreo",
        "Pringles",
        "Marmite",
        "Tabasco",
        "Kit Kat",
        "Heinz Ketchup",
    ],
    "product-airplane": [
        "Boeing 747",
        "Airbus A380",
        "Concorde",
        "Cessna 172",
        "Boeing 787",
        "Embraer E190",
        "Airbus A320",
        "Douglas DC-3",
    ],
    # other
    "other-disease": [
        "malaria",
        "tuberculosis",
        "diabetes",
        "influenza",
        "cholera",
        "measles",
        "asthma",
        "Parkinson's disease",
    ],
    "other-language": [
        "Swahili",
        "Portuguese",
        "Mandarin",
        "Tagalog",
        "Finnish",
        "Hindi",
        "Welsh",
        "Quechua",
    ],
    "other-award": [
        "Nobel Prize",
        "Pulitzer Prize",
        "Academy Award",
        "Booker Prize",
        "Grammy Award",
        "Fields Medal",
        "Turing Award",
        "Palme d'Or",
    ],
    "other-chemicalthing": [
        "sodium chloride",
        "benzene",
        "ethanol",
        "ozone",
        "glucose",
        "methane",
        "sulfuric acid",
        "ammonia",
    ],
    # building
    "building-hospital": [
        "Johns Hopkins Hospital",
        "Mayo Clinic",
        "Charite",
        "Guy's Hospital",
        "Mount Sinai Hospital",
        "Cleveland Clinic",
        "Royal Free Hospital",
        "Necker Hospital",
    ],
    "building-airport": [
        "Heathrow Airport",
        "Changi Airport",
        "Schiphol",
        "O'Hare",
        "Narita Airport",
        "Dubai International Airport",
        "JFK Airport",
        "Charles de Gaulle Airport",
    ],
    "building-stadium": [
        "Wembley Stadium",
        "Camp Nou",
        "Maracana",
        "Yankee Stadium",
        "Allianz Arena",
        "Eden Gardens",
        "Old Trafford",
        "Azteca Stadium",
    ],
    "building-restaurant": [
        "Noma",
        "El Bulli",
        "The French Laundry",
        "Osteria Francescana",
        "Le Bernardin",
        "Fat Duck",
        "Eleven Madison Park",
        "Mirazur",
    ],
    # event
    "event-sportsevent": [
        "World Cup",
        "Tour de France",
        "Super Bowl",
        "Wimbledon",
        "Olympic Games",
        "Boston Marathon",
        "Champions League final",
        "Ryder Cup",
    ],
    "event-election": [
        "2016 presidential election",
        "general election",
        "Brexit referendum",
        "midterm elections",
        "European Parliament election",
        "mayoral election",
        "2019 Indian general election",
        "snap election",
    ],
    "event-attack/battle/war/military conflict": [
        "Battle of Waterloo",
        "Korean War",
        "Siege of Leningrad",
        "Battle of Hastings",
        "Gulf War",
        "Battle of Midway",
        "Crimean War",
        "Hundred Years' War",
    ],
    "event-protest": [
        "Arab Spring",
        "Occupy Wall Street",
        "Salt March",
        "Stonewall riots",
        "Women's March",
        "Velvet Revolution",
        "Euromaidan",
        "Tiananmen Square protests",
    ],
    # organization
    "organization-company": [
        "Siemens",
        "Samsung",
        "Unilever",
        "Nestle",
        "Microsoft",
        "Toyota Motor",
        "Alibaba",
        "Shell",
    ],
    "organization-sportsteam": [
        "Real Madrid",
        "Boston Celtics",
        "Manchester United",
        "New Zealand All Blacks",
        "Chicago Bulls",
        "Bayern Munich",
        "Green Bay Packers",
        "Ajax",
    ],
    "organization-education": [
        "Harvard University",
        "University of Tokyo",
        "Sorbonne",
        "MIT",
        "University of Cape Town",
        "ETH Zurich",
        "Stanford University",
        "University of Oxford",
    ],
    "organization-government/governmentagency": [
        "NASA",
        "European Commission",
        "Federal Reserve",
        "World Health Organization",
        "Bundestag",
        "FBI",
        "Ministry of Finance",
        "Environmental Protection Agency",
    ],
    "organization-media/newspaper": [
        "The Guardian",
        "Le Monde",
        "BBC",
        "The New York Times",
        "Al Jazeera",
        "Der Spiegel",
        "Reuters",
        "The Washington Post",
    ],
    # location
    "location-GPE": ["Kenya", "Brazil", "Toronto", "Bavaria", "Vietnam", "Lagos", "Norway", "Texas"],
    "location-mountain": [
        "Mount Everest",
        "Kilimanjaro",
        "Mont Blanc",
        "Denali",
        "Mount Fuji",
        "Matterhorn",
        "Aconcagua",
        "K2",
    ],
    "location-bodiesofwater": [
        "Lake Victoria",
        "Amazon River",
        "Mediterranean Sea",
        "Lake Baikal",
        "Danube",
        "Pacific Ocean",
        "Nile",
        "Caspian Sea",
    ],
    "location-park": [
        "Central Park",
        "Yellowstone National Park",
        "Hyde Park",
        "Kruger National Park",
        "Banff National Park",
        "Golden Gate Park",
        "Yosemite",
        "Serengeti National Park",
    ],
    "location-island": [
        "Madagascar",
        "Iceland",
        "Bali",
        "Sicily",
        "Tasmania",
        "Zanzibar",
        "Crete",
        "Sri Lanka",
    ],
}

TEMPLATES: list[str] = [
    # person
    "The novelist {person-artist/author} signed copies of her new book at the festival .",
    "Critics praised the latest novel by {person-artist/author} for its prose .",
    "{person-artist/author} wrote most of the story during a long winter .",
    "{person-athlete} won the final in straight sets on Sunday .",
    "The striker {person-athlete} scored twice in the second half .",
    "{person-athlete} broke the record after months of training .",
    "{person-politician} addressed parliament about the budget crisis .",
    "Voters cheered as {person-politician} promised lower taxes .",
    "The former prime minister {person-politician} met the delegation .",
    "{person-scholar} published a paper on the structure of the atom .",
    "The lecture by {person-scholar} changed how physicists think .",
    "Students still read the theorems proved by {person-scholar} .",
    # art
    "The film {art-film} won best picture at the ceremony .",
    "We watched {art-film} at the cinema last night .",
    "The director of {art-film} cast unknown actors .",
    "The band played {art-music} as the encore .",
    "The album {art-music} topped the charts for weeks .",
    "The novel {art-writtenart} was first published in installments .",
    "Her favourite book is {art-writtenart} , which she rereads every summer .",
    "Visitors queued for hours to see {art-painting} in the gallery .",
    "The painting {art-painting} was restored last year .",
    "{person-artist/author} adapted {art-writtenart} for the stage .",
    # product
    "He drove a used {product-car} to work every day .",
    "The new {product-car} has a hybrid engine .",
    "Developers use {product-software} to build websites .",
    "The update to {product-software} fixed a security bug .",
    "She poured {product-food} on her breakfast .",
    "Sales of {product-food} rose in the holiday season .",
    "The airline retired its last {product-airplane} from the fleet .",
    "Passengers boarded the {product-airplane} for the long flight .",
    # other
    "Doctors warned that {other-disease} is spreading among children .",
    "A new vaccine against {other-disease} entered trials .",
    "Millions of people speak {other-language} at home .",
    "The school now teaches classes in {other-language} .",
    "She received the {other-award} for her research .",
    "The {other-award} was announced in the morning .",
    "Chemists measured how {other-chemicalthing} reacts with water .",
    "Exposure to {other-chemicalthing} can irritate the lungs .",
    "{person-scholar} won the {other-award} for the discovery .",
    # building
    "The patient was flown to {building-hospital} for surgery .",
    "Nurses at {building-hospital} went on strike .",
    "Flights from {building-airport} were delayed by fog .",
    "The new terminal at {building-airport} opened in May .",
    "Fans filled {building-stadium} for the derby .",
    "The concert at {building-stadium} sold out in minutes .",
    "We booked a table at {building-restaurant} months ahead .",
    "The chef of {building-restaurant} earned three stars .",
    # event
    "Millions watched the {event-sportsevent} on television .",
    "The team trained hard before the {event-sportsevent} .",
    "Turnout in the {event-election} was the highest in decades .",
    "Polls opened early for the {event-election} .",
    "Historians still debate the {event-attack/battle/war/military conflict} .",
    "Thousands of soldiers died in the {event-attack/battle/war/military conflict} .",
    "Students joined the {event-protest} to demand reform .",
    "Police watched the {event-protest} from the rooftops .",
    "{person-athlete} won gold at the {event-sportsevent} .",
    # organization
    "Shares of {organization-company} fell after the earnings report .",
    "{organization-company} announced a new factory and hundreds of jobs .",
    "The chief executive of {organization-company} resigned on Monday .",
    "{organization-sportsteam} beat their rivals in extra time .",
    "The coach of {organization-sportsteam} praised the young players .",
    "Fans of {organization-sportsteam} celebrated in the streets .",
    "She studied chemistry at {organization-education} .",
    "Researchers at {organization-education} built a new telescope .",
    "{organization-education} raised its tuition fees again .",
    "{organization-government/governmentagency} issued new rules on emissions .",
    "A spokesperson for {organization-government/governmentagency} declined to comment .",
    "The report by {organization-government/governmentagency} was made public .",
    "According to {organization-media/newspaper} , the talks collapsed overnight .",
    "The editor of {organization-media/newspaper} defended the story .",
    "{organization-media/newspaper} broadcast the interview live .",
    # location
    "Heavy rain caused floods across {location-GPE} this week .",
    "She moved to {location-GPE} to start a new job .",
    "Tourism in {location-GPE} has doubled since the war .",
    "Climbers reached the summit of {location-mountain} at dawn .",
    "Snow covered {location-mountain} earlier than usual .",
    "Fishermen on {location-bodiesofwater} reported a poor catch .",
    "The ship crossed the {location-bodiesofwater} in three days .",
    "Joggers crowded {location-park} on the first warm day .",
    "Rangers in {location-park} counted the elephants .",
    "Ferries to {location-island} were cancelled because of the storm .",
    "Farmers on {location-island} grow vanilla and cloves .",
    # mixed
    "{organization-company} opened an office in {location-GPE} last year .",
    "{person-politician} visited {organization-education} on Friday .",
    "{organization-media/newspaper} interviewed {person-athlete} after the match .",
    "{organization-sportsteam} will play at {building-stadium} next season .",
    "{organization-government/governmentagency} sent inspectors to {location-park} .",
    "The expedition left {location-GPE} to climb {location-mountain} .",
    "{person-scholar} taught at {organization-education} for ten years .",
    "A cruise around {location-island} stops at the {location-bodiesofwater} coast .",
]

SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("person", "art", "product", "other"),
    "dev": ("building", "event"),
    "test": ("organization", "location"),
}

_SLOT = re.compile(r"\{([^}]+)\}")


def split_types(split: str) -> list[str]:
    """Fine types of a split of the INTRA-style partition."""
    if split not in SPLITS:
        raise ValueError(f"synthetic: split={split!r} must be one of {sorted(SPLITS)}")
    return sorted(t for t in ENTITIES if t.split("-")[0] in SPLITS[split])


def _render(template: str, rng: random.Random, keep: set[str]) -> Sentence:
    words: list[str] = []
    labels: list[str] = []
    pos = 0
    for m in _SLOT.finditer(template):
        for w, _, _ in split_words(template[pos : m.start()]):
            words.append(w)
            labels.append("O")
        etype = m.group(1)
        name = rng.choice(ENTITIES[etype])
        for w, _, _ in split_words(name):
            words.append(w)
            labels.append(etype if etype in keep else "O")
        pos = m.end()
    for w, _, _ in split_words(template[pos:]):
        words.append(w)
        labels.append("O")
    return Sentence(words, labels)


def synthetic_corpus(split: str, n_sentences: int, seed: int = 0) -> list[Sentence]:
    """Sentences for one split; every sentence holds at least one entity of the split's types."""
    keep = set(split_types(split))
    templates = [t for t in TEMPLATES if set(_SLOT.findall(t)) & keep]
    rng = random.Random(seed)
    return [_render(rng.choice(templates), rng, keep) for _ in range(n_sentences)]


def synthetic_episodes(
    split: str, n_way: int, k_shot: int, n_episodes: int, seed: int = 0, n_sentences: int | None = None
) -> list:
    """Few-NERD-style episodes (greedy N-way K~2K-shot sampler) over a synthetic split."""
    from .sampler import sample_episodes

    n = n_sentences if n_sentences is not None else max(400, 40 * n_way * k_shot)
    corpus = synthetic_corpus(split, n, seed=seed)
    return sample_episodes(corpus, n_way, k_shot, n_episodes, seed=seed + 1)


def coarse_types(types: Sequence[str]) -> set[str]:
    return {t.split("-")[0] for t in types}
