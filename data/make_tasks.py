"""Generate the bundled entity-extraction and terminology datasets (``data/entities/``, ``data/terminology/``).

Stdlib only and seeded, like ``make_bundled.py`` (whose review files it leaves untouched), so
every run writes byte-identical files.

* ``entities/``: short sentences mentioning fictional people, organisations (companies named
  after the review brands, hospitals, universities) and places, with the target written as
  ``person: A, B; organisation: C; location: none`` (types in that fixed order, entities of a
  type in order of appearance, ``none`` when a type is absent).
* ``terminology/{general,medical,paediatric_cardiology}/``: "what does this abbreviation stand
  for?" rows. Each term has three hand-written clauses; train wraps clauses 0 and 1 in the
  train wrappers, validation and test wrap clause 2 in their own wrappers, so no validation or
  test context occurs in train (the term itself does: the task tests recall of the expansion).
  Some terms mean different things in different domains on purpose (PE, PS, HR, ASD, ...);
  ``collides_with`` lists the other meanings, and every term is in every split.

Usage::

    python data/make_tasks.py              # writes data/entities/ and data/terminology/
    python data/make_tasks.py --seed 7 --out /tmp/data
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from pathlib import Path

from make_bundled import BRANDS, CATEGORIES  # shared vocabulary: the review brands name the companies

ENTITY_SPLITS: dict[str, int] = {"train": 1500, "validation": 200, "test": 200}
TERM_SPLITS: dict[str, int] = {"train": 600, "validation": 80, "test": 80}
EMPTY_RATE = 0.06  # share of entity-free sentences, decided per row so every split gets the same share
ENTITY_TYPES = ("person", "organisation", "location")

# fmt: off
FIRST_NAMES = ["Mara", "Tobias", "Elena", "Rohan", "Ingrid", "Dmitri", "Aisha", "Callum", "Priya", "Felix", "Nadia",
               "Oskar", "Leona", "Tariq", "Sienna", "Mateo", "Hana", "Declan", "Yara", "Bram", "Imogen", "Kofi",
               "Lucia", "Anders", "Zara", "Emeka", "Freya", "Joaquin", "Mei", "Ronan", "Talia", "Idris", "Greta",
               "Soren", "Amara", "Wes", "Liesel", "Niamh", "Cyrus", "Odette"]
LAST_NAMES = ["Quinlan", "Okafor", "Marsh", "Varga", "Lindqvist", "Castellano", "Brennan", "Achterberg", "Moreau",
              "Holloway", "Nakamura", "Fairweather", "Oyelaran", "Dunmore", "Petrov", "Ashcombe", "Kowalczyk",
              "Trevanion", "Osei", "Pemberton", "Vasquez", "Rutherford", "Halvorsen", "Whitlock", "Iyer", "Delacroix",
              "Thornbury", "Kavanagh", "Elstow", "Bakshi", "Rosales", "Yardley", "Carrow", "Eskildsen", "Montague",
              "Abernethy", "Sandoval", "Penhallow", "Ferreira", "Szabo"]
PERSON_TITLES = ["Dr", "Professor"]  # before some names, never part of the entity; ungendered
TOWNS = ["Averton", "Millbrook", "Eastholm", "Caldmoor", "Lindale", "Westmere", "Brackenford", "Ashbury", "Duncliffe",
         "Ellisford", "Greywater", "Kestleton", "Oakhurst", "Pellbridge", "Ravensmoor", "Thornwick", "Wrexford",
         "Corrandale", "Fenmouth", "Highcombe", "Larkspur Bay", "Marlow Heath", "Upper Hadley", "Northfield"]
REAL_PLACES = ["Lisbon", "Nairobi", "Toronto", "Norway", "Chile", "Osaka", "Melbourne", "Ghana", "Portugal", "Vienna",
               "Canada", "Seoul"]
COMPANY_SUFFIXES = ["Labs", "Systems", "Foods", "Logistics", "Energy", "Analytics", "Holdings", "Robotics", "Media",
                    "Pharmaceuticals", "Appliances", "Outdoor"]
SAINTS = ["Agnes", "Columba", "Bride", "Elspeth", "Aidan", "Winifred"]
HOSPITAL_PATTERNS = ["{town} General Hospital", "{town} Children's Hospital", "St {saint}'s Hospital",
                     "Royal {town} Infirmary"]
UNIVERSITY_PATTERNS = ["University of {town}", "{town} Institute of Technology", "{town} College of Art"]
WHEN = ["last spring", "in March", "on Monday", "this year", "in 2019", "last week", "two years ago", "in the autumn",
        "after the holidays", "yesterday"]

# Slots: {P1} a person who may get a title, {p1} a bare name, {O1} any organisation, {OC1} a company,
# {OH1} a hospital, {OU1} a university, {L1} a place; {when} and {category} are fillers, not entities.
ENTITY_TEMPLATES = [
    "{P1} joined {OH1} in {L1} {when}.",
    "{P1} and {P2} met at {OC1} to discuss the merger.",
    "{OC1} opened a new office in {L1}.",
    "{OC1} announced a partnership with {OC2} {when}.",
    "{P1} moved from {L1} to {L2} {when}.",
    "According to {P1}, {OC1} will hire forty engineers in {L1}.",
    "The conference in {L1} was sponsored by {O1} and {O2}.",
    "{P1} was appointed head of research at {O1}.",
    "Flights between {L1} and {L2} were cancelled because of fog.",
    "{P1} thanked {P2} for the help with the move.",
    "{P1} grew up in {L1} before studying at {OU1}.",
    "A spokesperson for {O1} declined to comment.",
    "{p1}, a nurse at {OH1}, ran the marathon in {L1} {when}.",
    "Staff at {O1} in {L1} welcomed {P1} as the new director.",
    "{OC1} recalled a batch of {category}s sold in {L1}.",
    "{OC1} makes the {category} that {P1} bought {when}.",
    "The weather in {L1} was mild all week.",
    "{P1} said the results looked promising.",
    "Researchers from {OU1} and {OH1} published a study on sleep.",
    "{P1} flew to {L1} to visit {P2}.",
    "The train to {L1} stops at {L2} on weekdays.",
    "{P1} left {OC1} after ten years to found {OC2}.",
    "The new bridge connects {L1} with {L2}.",
    "{P1} is treated at {OH1} every month.",
    "Students from {OU1} volunteered in {L1} {when}.",
    "{OC1} moved its headquarters from {L1} to {L2}.",
    "{P1}, {p2} and {p3} signed the letter.",
    "{P1} emailed the team from {L1} {when}.",
    "Profits at {OC1} rose sharply {when}.",
    "{P1} wrote the report with help from {O1}.",
    "Patients from {L1} are now referred to {OH1}.",
    "{P1} bought a {category} on the way home.",
    "{OC1} is hiring in {L1}, {L2} and {L3}.",
    "Dr {p1} examined the patient while {p2} took notes.",
    "{P1} and {P2} opened a bakery in {L1} {when}.",
    "Delivery drivers for {OC1} went on strike {when}.",
    "{P1} is a professor at {OU1}.",
    "{P1} from {OC1} presented the results in {L1}.",
    "The {category} arrived a week late {when}.",
    "Nobody answered the phone when I called {when}.",
    "The meeting was moved to next Tuesday because the {category} broke.",
    "It rained all afternoon {when}, so the match was called off.",
    "My new {category} stopped working {when}.",
]

# Terminology: (term, expansion, [clause for train, clause for train, clause held out for validation/test]).
# Expansions are facts; British spelling throughout. A clause uses the term and never its expansion.
GENERAL = [
    ("ASAP", "as soon as possible",
     ["Please send the invoice ASAP.", "I need the keys back ASAP, the landlord is coming.",
      "Call me back ASAP when you land."]),
    ("FAQ", "frequently asked questions",
     ["Check the FAQ page before you email support.", "The answer is in the FAQ on our website.",
      "We added three new entries to the FAQ."]),
    ("CEO", "chief executive officer",
     ["The CEO will speak at the all-hands meeting.", "Our CEO resigned on Friday.",
      "The board is looking for a new CEO."]),
    ("CFO", "chief financial officer",
     ["The CFO signed off the budget.", "Ask the CFO about the quarterly figures.",
      "The CFO presented the annual accounts."]),
    ("GPS", "global positioning system",
     ["The GPS took us down a farm track.", "My watch has built-in GPS for running.",
      "Turn on the GPS so the app can find you."]),
    ("USB", "universal serial bus",
     ["Plug the USB cable into the laptop.", "The charger has two USB ports.",
      "I copied the photos onto a USB stick."]),
    ("ETA", "estimated time of arrival",
     ["What is your ETA for the meeting?", "The driver says the ETA is ten minutes.",
      "Text me your ETA when you leave."]),
    ("DIY", "do it yourself",
     ["We spent the weekend on DIY in the kitchen.", "The shelf was a DIY job.", "She bought paint at the DIY store."]),
    ("FYI", "for your information",
     ["FYI, the office is closed on Monday.", "Just FYI, the printer is broken again.",
      "Forwarding this FYI, no action needed."]),
    ("BTW", "by the way",
     ["BTW, I left your umbrella at reception.", "Great party BTW, thanks for inviting me.",
      "BTW the train leaves earlier tomorrow."]),
    ("AKA", "also known as",
     ["Our manager, AKA the coffee monster, is on holiday.",
      "The town's bakery, AKA the best place for buns, closed early.",
      "My brother, AKA the family chef, is cooking tonight."]),
    ("ATM", "automated teller machine",
     ["I took cash out at the ATM by the station.", "The ATM swallowed my card.", "Is there an ATM near the hotel?"]),
    ("PIN", "personal identification number",
     ["Never share your PIN with anyone.", "I forgot the PIN for my new card.",
      "Enter your PIN and press the green button."]),
    ("VIP", "very important person",
     ["We got VIP tickets for the concert.", "The VIP lounge was full.", "She was treated like a VIP at the launch."]),
    ("HQ", "headquarters",
     ["The parcel was sent to HQ by mistake.", "Everyone is called back to HQ on Friday.",
      "Our HQ is moving to a bigger building."]),
    ("HR", "human resources",
     ["Send your holiday request to HR.", "HR is running a training day on Tuesday.",
      "I have a meeting with HR about my contract."]),
    ("PR", "public relations",
     ["The PR team wrote the press release.", "That advert was a PR disaster.",
      "She works in PR for a fashion brand."]),
    ("PE", "physical education",
     ["The kids have PE on Thursday afternoon.", "Do not forget your trainers for PE.",
      "Our PE teacher made us run laps."]),
    ("PS", "postscript",
     ["She added a PS at the bottom of the letter.", "PS: bring a jumper, it gets cold.",
      "Read the PS at the end of my email."]),
    ("PA", "personal assistant",
     ["Book the meeting through my PA.", "Her PA manages the diary.", "The director's PA called to confirm."]),
    ("PDA", "personal digital assistant",
     ["In 2002 I kept my diary on a PDA.", "My old PDA had a tiny stylus.",
      "Before smartphones, he carried a PDA everywhere."]),
    ("MVP", "most valuable player",
     ["She was named MVP of the tournament.", "Our goalkeeper won the MVP award.",
      "The fans voted him MVP of the season."]),
    ("TA", "teaching assistant",
     ["The TA marks our homework on Fridays.", "Ask the TA if you are stuck on the exercise.",
      "Our TA runs the Tuesday tutorial."]),
    ("LA", "Los Angeles",
     ["We flew from New York to LA for the film festival.", "The traffic in LA is terrible.",
      "My cousin moved to LA to become an actor."]),
    ("AR", "augmented reality",
     ["The museum app uses AR to show dinosaurs.", "Try the AR filter on your phone.",
      "The shop lets you place furniture in your room with AR."]),
    ("VR", "virtual reality",
     ["I tried a VR headset at the fair.", "The game is only playable in VR.",
      "Our school bought VR goggles for science lessons."]),
    ("OT", "overtime",
     ["I worked ten hours of OT last week.", "Is OT paid at time and a half?",
      "Management cancelled all OT this month."]),
    ("ID", "identification",
     ["Bring photo ID to the polling station.", "The bouncer asked for ID at the door.",
      "You need ID to collect the parcel."]),
    ("CV", "curriculum vitae",
     ["Attach your CV to the job application.", "I updated my CV last night.", "Keep your CV to two pages."]),
    ("MS", "manuscript",
     ["The author sent the MS to her publisher.", "The editor returned the MS with comments.",
      "Print two copies of the MS for the review."]),
    ("TBA", "to be announced",
     ["The venue is still TBA.", "Speakers TBA, watch this space.", "The date of the final is TBA."]),
    ("TBC", "to be confirmed",
     ["Dinner on Saturday, time TBC.", "The guest list is TBC.", "Location TBC, probably the usual pub."]),
    ("DOB", "date of birth",
     ["Write your DOB on the form.", "The nurse checked my name and DOB.", "Please confirm your DOB for security."]),
    ("RAM", "random access memory",
     ["The laptop has sixteen gigabytes of RAM.", "More RAM made the old computer much faster.",
      "This phone has plenty of RAM for games."]),
    ("CPU", "central processing unit",
     ["The CPU overheats when I play games.", "Upgrading the CPU did not help.", "The new laptop has a faster CPU."]),
    ("GPU", "graphics processing unit",
     ["Training the model needs a big GPU.", "The GPU fan is very loud.", "My GPU cannot run the new game."]),
    ("PDF", "portable document format",
     ["Save the report as a PDF.", "I cannot open the PDF on my phone.", "Please send the signed form as a PDF."]),
    ("URL", "uniform resource locator",
     ["Paste the URL into your browser.", "The URL in the email looks suspicious.",
      "Copy the URL of the page and send it to me."]),
    ("HTML", "hypertext markup language",
     ["The web page is written in HTML.", "I learned HTML to build my own blog.", "Check the HTML for a missing tag."]),
    ("LED", "light-emitting diode",
     ["The LED on the charger turns green when full.", "We switched every bulb to LED.",
      "A red LED means the battery is low."]),
    ("LCD", "liquid crystal display",
     ["The LCD on the thermostat is cracked.", "Old LCD screens were heavy.",
      "The camera has a small LCD on the back."]),
    ("SIM", "subscriber identity module",
     ["Put the new SIM card in your phone.", "My phone says no SIM detected.", "I bought a local SIM at the airport."]),
    ("SMS", "short message service",
     ["You will get the code by SMS.", "The bank sent an SMS alert.", "Reply to the SMS to confirm your booking."]),
    ("OS", "operating system",
     ["Update the OS before installing the app.", "My phone's OS is out of date.",
      "The new OS drains the battery faster."]),
    ("AI", "artificial intelligence",
     ["The app uses AI to sort your photos.", "Everyone at the conference talked about AI.",
      "The chess program runs on AI."]),
    ("UK", "United Kingdom",
     ["She moved to the UK for university.", "Shipping to the UK is free.", "The UK has a rainy reputation."]),
    ("EU", "European Union",
     ["The EU introduced new rules for chargers.", "Travel within the EU is easy.",
      "The EU is made up of member states."]),
    ("UN", "United Nations",
     ["The UN held an emergency session.", "She works for the UN in Geneva.",
      "The UN sent aid to the flooded region."]),
    ("NGO", "non-governmental organisation",
     ["He volunteers for an NGO that builds schools.", "The NGO delivered food parcels.",
      "A local NGO signed the open letter."]),
    ("IT", "information technology",
     ["Call IT if your laptop will not start.", "The IT department reset my password.",
      "She has worked in IT for twenty years."]),
    ("KPI", "key performance indicator",
     ["Customer satisfaction is our main KPI.", "Each team agrees one KPI for the quarter.",
      "The sales KPI was missed again."]),
    ("ROI", "return on investment",
     ["The ROI on the new machines was excellent.", "What ROI do you expect from the campaign?",
      "The board wants a clear ROI before approving it."]),
    ("CC", "carbon copy",
     ["Please CC me on the reply.", "I was CC'd on the email to the client.", "Add the manager in CC."]),
    ("BCC", "blind carbon copy",
     ["Put everyone in BCC so addresses stay private.", "I was in BCC on that message.",
      "Use BCC for the newsletter."]),
    ("AOB", "any other business",
     ["The last item on the agenda is AOB.", "Under AOB, we discussed the party.",
      "Any points for AOB before we finish?"]),
    ("EOD", "end of day",
     ["Please send the draft by EOD.", "I will reply by EOD tomorrow.", "The report is due EOD Friday."]),
    ("OOO", "out of office",
     ["I am OOO until Monday.", "Her OOO reply says she is on holiday.", "Set your OOO message before you leave."]),
    ("WFH", "working from home",
     ["I am WFH today because of the strike.", "Our team is WFH on Fridays.", "WFH saves me two hours of commuting."]),
    ("R&D", "research and development",
     ["The company spends a lot on R&D.", "She leads the R&D lab.", "The new product came out of R&D last year."]),
    ("VPN", "virtual private network",
     ["Connect to the VPN to reach the shared drive.", "I use a VPN on public wifi.",
      "The VPN keeps dropping out at home."]),
    ("SSD", "solid-state drive",
     ["Swapping the hard disk for an SSD sped everything up.", "The laptop has a one-terabyte SSD.",
      "My SSD is almost full."]),
    ("PhD", "Doctor of Philosophy",
     ["She is finishing her PhD in chemistry.", "His PhD took five years.", "He started a PhD after his master's."]),
    ("MBA", "Master of Business Administration",
     ["He is studying for an MBA at night.", "An MBA helped her move into management.",
      "The MBA course includes a group project."]),
    ("GDP", "gross domestic product",
     ["The country's GDP grew by two percent.", "GDP fell during the recession.", "Tourism is a large share of GDP."]),
    ("VAT", "value added tax",
     ["The price includes VAT.", "Businesses must register for VAT.", "VAT on the invoice is twenty percent."]),
    ("SUV", "sport utility vehicle",
     ["They bought a big SUV for camping trips.", "The SUV barely fits in our garage.", "Her SUV uses a lot of fuel."]),
    ("UFO", "unidentified flying object",
     ["My uncle swears he saw a UFO.", "The UFO turned out to be a weather balloon.",
      "The film is about a UFO landing."]),
]
MEDICAL = [
    ("BP", "blood pressure",
     ["BP 150/95, recheck in one week.", "Her BP was low after the fall.", "Started on ramipril for high BP."]),
    ("HR", "heart rate",
     ["HR 110, febrile and flushed.", "HR settled to 80 after fluids.", "Resting HR 52, known runner."]),
    ("RR", "respiratory rate",
     ["RR 28, using accessory muscles.", "RR back to 16 on room air.", "Observations: RR 22, sats 94%."]),
    ("ECG", "electrocardiogram",
     ["ECG shows sinus rhythm.", "A 12-lead ECG was done on arrival.", "Repeat ECG in the morning."]),
    ("EEG", "electroencephalogram",
     ["EEG requested after the first seizure.", "The EEG showed no epileptiform activity.",
      "Sleep-deprived EEG booked for Friday."]),
    ("MRI", "magnetic resonance imaging",
     ["MRI of the knee shows a meniscal tear.", "MRI brain booked as an outpatient.",
      "Claustrophobic, so sedated for the MRI."]),
    ("CT", "computed tomography",
     ["CT head showed no bleed.", "CT abdomen confirms appendicitis.", "Urgent CT requested after the fall."]),
    ("ICU", "intensive care unit",
     ["Transferred to ICU for ventilation.", "Two days on ICU after surgery.",
      "ICU outreach team reviewed her overnight."]),
    ("COPD", "chronic obstructive pulmonary disease",
     ["Known COPD, on home oxygen.", "COPD exacerbation treated with steroids.", "Ex-smoker with moderate COPD."]),
    ("MI", "myocardial infarction",
     ["Troponin rise consistent with MI.", "Previous MI in 2015, stented.",
      "Admitted with suspected MI after chest pain."]),
    ("CHF", "congestive heart failure",
     ["CHF with bilateral ankle swelling.", "Diuretics increased for CHF.", "Known CHF, breathless on exertion."]),
    ("DVT", "deep vein thrombosis",
     ["Swollen left calf, query DVT.", "Doppler scan confirmed a DVT.", "On anticoagulation for a recent DVT."]),
    ("PE", "pulmonary embolism",
     ["CT pulmonary angiogram confirmed PE.", "Sudden breathlessness, rule out PE.", "Started on apixaban for PE."]),
    ("UTI", "urinary tract infection",
     ["Dipstick positive, treated as UTI.", "Recurrent UTI, referred to urology.",
      "Confused elderly patient, likely UTI."]),
    ("URTI", "upper respiratory tract infection",
     ["Cough and runny nose, probable URTI.", "URTI, advised fluids and rest.", "Viral URTI, no antibiotics needed."]),
    ("GP", "general practitioner",
     ["Follow up with your GP in two weeks.", "Referred by the GP for a rash.", "The GP restarted her blood thinner."]),
    ("ED", "emergency department",
     ["Brought to ED by ambulance.", "Seen in ED and sent home.", "Four hours waiting in ED."]),
    ("BMI", "body mass index",
     ["BMI 32, advised weight loss.", "BMI calculated at the check-up.", "Low BMI, dietitian referral."]),
    ("FBC", "full blood count",
     ["FBC shows a low haemoglobin.", "Repeat FBC in a week.", "FBC and clotting sent from ED."]),
    ("CRP", "C-reactive protein",
     ["CRP 180, starting antibiotics.", "CRP falling, infection improving.", "Raised CRP on admission bloods."]),
    ("ESR", "erythrocyte sedimentation rate",
     ["ESR 90, query giant cell arteritis.", "ESR normal at follow-up.", "Request ESR with the next bloods."]),
    ("IV", "intravenous",
     ["Give IV fluids over four hours.", "Switched from IV to oral antibiotics.", "IV access lost overnight."]),
    ("IM", "intramuscular",
     ["Given IM adrenaline for anaphylaxis.", "Vitamin B12 injected IM every three months.",
      "The vaccine is given IM in the upper arm."]),
    ("SC", "subcutaneous",
     ["Enoxaparin 40 mg SC once daily.", "Insulin given SC before meals.", "SC fluids for the palliative patient."]),
    ("TB", "tuberculosis",
     ["Night sweats and weight loss, screen for TB.", "Contact tracing after a TB case.", "Treated for TB in 2010."]),
    ("HIV", "human immunodeficiency virus",
     ["HIV test offered and accepted.", "Well-controlled HIV on antiretrovirals.", "HIV viral load undetectable."]),
    ("AIDS", "acquired immunodeficiency syndrome",
     ["Advanced HIV progressing to AIDS.", "AIDS-defining illness ruled out.",
      "She volunteers at an AIDS charity clinic."]),
    ("CKD", "chronic kidney disease",
     ["CKD stage 3, monitor creatinine.", "Known CKD, avoid NSAIDs.", "CKD secondary to diabetes."]),
    ("AKI", "acute kidney injury",
     ["Creatinine doubled, AKI stage 2.", "AKI after dehydration, now resolving.", "Stop metformin during the AKI."]),
    ("CVA", "cerebrovascular accident",
     ["Previous CVA with left-sided weakness.", "Admitted with a suspected CVA.", "History of CVA, on clopidogrel."]),
    ("TIA", "transient ischaemic attack",
     ["Ten minutes of slurred speech, likely TIA.", "Seen in the TIA clinic within a day.",
      "After the TIA she started a statin."]),
    ("AF", "atrial fibrillation",
     ["ECG shows AF with a fast rate.", "Known AF, on warfarin.", "New AF, rate control started."]),
    ("CABG", "coronary artery bypass graft",
     ["Triple CABG in 2018.", "Listed for CABG after the angiogram.", "Post-CABG rehabilitation going well."]),
    ("PCI", "percutaneous coronary intervention",
     ["Primary PCI to the right coronary artery.", "Stent placed during PCI.", "Aspirin after the PCI."]),
    ("NSAID", "non-steroidal anti-inflammatory drug",
     ["Avoid NSAID use with her ulcer.", "Ibuprofen is an NSAID.", "Knee pain eased with a topical NSAID."]),
    ("GORD", "gastro-oesophageal reflux disease",
     ["Heartburn after meals, likely GORD.", "GORD controlled with omeprazole.",
      "Known GORD, raise the head of the bed."]),
    ("IBD", "inflammatory bowel disease",
     ["Bloody diarrhoea, query IBD.", "IBD nurse reviewed her today.", "Family history of IBD."]),
    ("IBS", "irritable bowel syndrome",
     ["Bloating and cramps, consistent with IBS.", "IBS symptoms worse with stress.", "Low-FODMAP diet for IBS."]),
    ("RA", "rheumatoid arthritis",
     ["Swollen finger joints, known RA.", "RA on methotrexate.", "Rheumatology review for RA flare."]),
    ("MS", "multiple sclerosis",
     ["Relapsing-remitting MS, on disease-modifying therapy.", "Optic neuritis, query MS.",
      "MS nurse reviewed her walking."]),
    ("ASD", "autism spectrum disorder",
     ["Seven-year-old with ASD, dislikes loud rooms.", "ASD assessment booked with the developmental team.",
      "Diagnosed with ASD at age four."]),
    ("ADHD", "attention deficit hyperactivity disorder",
     ["ADHD, on methylphenidate.", "Teacher concerns about ADHD.", "ADHD assessment requested by school."]),
    ("CHD", "coronary heart disease",
     ["Known CHD, on aspirin and a statin.", "Risk factors for CHD include smoking.", "CHD with stable angina."]),
    ("OT", "occupational therapy",
     ["OT assessment before discharge home.", "OT provided a raised toilet seat.", "Refer to OT for hand splints."]),
    ("ID", "infectious diseases",
     ["Discussed with ID, continue antibiotics.", "ID team advised a longer course.",
      "Referred to ID for a fever after travel."]),
    ("CV", "cardiovascular",
     ["CV examination unremarkable.", "High CV risk, start a statin.", "CV system: heart sounds normal."]),
    ("LA", "local anaesthetic",
     ["Wound sutured under LA.", "LA infiltrated before the biopsy.", "Mole removed under LA in clinic."]),
    ("AS", "ankylosing spondylitis",
     ["Young man with back stiffness, query AS.", "AS, HLA-B27 positive.", "Rheumatology follow-up for AS."]),
    ("SOB", "shortness of breath",
     ["Complains of SOB on climbing stairs.", "SOB worse lying flat.", "Sudden SOB and chest pain."]),
    ("DNR", "do not resuscitate",
     ["DNR order signed by the family.", "DNR status discussed with the patient.",
      "Check the DNR form before the ward round."]),
    ("ARDS", "acute respiratory distress syndrome",
     ["Ventilated for ARDS after pneumonia.", "ARDS with bilateral infiltrates.", "Prone positioning for ARDS."]),
    ("CPR", "cardiopulmonary resuscitation",
     ["CPR started by a bystander.", "Twenty minutes of CPR before return of circulation.",
      "CPR training for all ward staff."]),
    ("ENT", "ear, nose and throat",
     ["Referred to ENT for recurrent tonsillitis.", "ENT removed a bead from the child's nose.",
      "ENT clinic review for hearing loss."]),
    ("DKA", "diabetic ketoacidosis",
     ["Ketones high, treated as DKA.", "DKA protocol started in ED.", "Second episode of DKA this year."]),
    ("PPI", "proton pump inhibitor",
     ["Start a PPI for the ulcer.", "On a PPI for reflux.", "Stop the PPI after eight weeks."]),
    ("SSRI", "selective serotonin reuptake inhibitor",
     ["Started on an SSRI for depression.", "SSRI dose increased at review.", "Sertraline is an SSRI."]),
    ("OSA", "obstructive sleep apnoea",
     ["Snoring and daytime sleepiness, query OSA.", "OSA treated with CPAP.", "Sleep study confirmed OSA."]),
    ("HRT", "hormone replacement therapy",
     ["Started HRT for hot flushes.", "HRT patch changed twice weekly.", "Discussed the risks of HRT."]),
    ("ABG", "arterial blood gas",
     ["ABG shows respiratory acidosis.", "Repeat ABG after thirty minutes.", "ABG taken from the radial artery."]),
    ("CXR", "chest X-ray",
     ["CXR shows right lower lobe consolidation.", "CXR clear, no pneumothorax.", "Repeat CXR in six weeks."]),
    ("eGFR", "estimated glomerular filtration rate",
     ["eGFR 45, reduce the metformin dose.", "eGFR stable at the annual check.", "Falling eGFR, refer to renal."]),
]
PAEDIATRIC_CARDIOLOGY = [
    ("ASD", "atrial septal defect",
     ["Secundum ASD with left-to-right shunt.", "ASD closed with a device at age four.",
      "Small ASD, review in two years."]),
    ("VSD", "ventricular septal defect",
     ["Pt with VSD, murmur grade 3.", "Perimembranous VSD closed surgically.", "Small muscular VSD, likely to close."]),
    ("PDA", "patent ductus arteriosus",
     ["Preterm infant with a large PDA.", "PDA treated with ibuprofen.", "Duct-dependent, keep the PDA open."]),
    ("TOF", "tetralogy of Fallot",
     ["TOF repaired at six months.", "Cyanotic spells in a baby with TOF.",
      "Adolescent with repaired TOF, pulmonary regurgitation."]),
    ("HLHS", "hypoplastic left heart syndrome",
     ["Antenatal diagnosis of HLHS.", "HLHS after the Norwood procedure.", "HLHS, planned for staged palliation."]),
    ("CoA", "coarctation of the aorta",
     ["Weak femoral pulses, query CoA.", "CoA repaired in the neonatal period.", "Re-narrowing after CoA repair."]),
    ("TGA", "transposition of the great arteries",
     ["Cyanosed newborn with TGA.", "Arterial switch for TGA on day seven.", "TGA with intact ventricular septum."]),
    ("AVSD", "atrioventricular septal defect",
     ["Baby with Down syndrome and complete AVSD.", "AVSD repair at four months.",
      "Partial AVSD with a cleft mitral valve."]),
    ("PS", "pulmonary stenosis",
     ["Moderate valvar PS, balloon planned.", "PS gradient 40 mmHg on echo.", "Mild PS, discharge from clinic."]),
    ("PFO", "patent foramen ovale",
     ["Small PFO with left-to-right flow.", "PFO, no follow-up needed.", "Incidental PFO on echo."]),
    ("AS", "aortic stenosis",
     ["Critical AS in a newborn, balloon valvotomy.", "Bicuspid valve with mild AS.",
      "Moderate AS, avoid competitive sport."]),
    ("PA", "pulmonary artery",
     ["Branch PA stenosis on the left.", "Dilated main PA on echo.", "PA pressure estimated from the TR jet."]),
    ("MVP", "mitral valve prolapse",
     ["Teenager with MVP and a click.", "Mild MVP, no regurgitation.", "MVP in a girl with Marfan syndrome."]),
    ("TA", "tricuspid atresia",
     ["TA with a small right ventricle.", "TA, on the single-ventricle pathway.",
      "Glenn operation for TA at five months."]),
    ("LA", "left atrium",
     ["Dilated LA from the large shunt.", "LA pressure raised on catheter.", "LA to aorta ratio 1.8."]),
    ("RA", "right atrium",
     ["Dilated RA in Ebstein anomaly.", "RA pressure 8 at catheter.", "Thrombus seen in the RA."]),
    ("RV", "right ventricle",
     ["RV hypertrophy on echo.", "Dilated RV after TOF repair.", "RV pressure is half systemic."]),
    ("LV", "left ventricle",
     ["LV function good on echo.", "Dilated LV with reduced ejection fraction.",
      "Small LV in the borderline left heart."]),
    ("AR", "aortic regurgitation",
     ["Mild AR after the balloon.", "Progressive AR, refer to surgeons.", "Trivial AR, no action."]),
    ("MR", "mitral regurgitation",
     ["Moderate MR after AVSD repair.", "MR from the cleft valve.", "Severe MR, listed for repair."]),
    ("TR", "tricuspid regurgitation",
     ["Mild TR, normal RV pressure.", "TR jet gives an RV pressure of 40.", "Severe TR in Ebstein anomaly."]),
    ("SVT", "supraventricular tachycardia",
     ["Infant with SVT, rate 280.", "SVT stopped with adenosine.", "Recurrent SVT, starting propranolol."]),
    ("WPW", "Wolff-Parkinson-White",
     ["Delta wave on ECG, WPW pattern.", "WPW, referred for ablation.", "Palpitations in a boy with WPW."]),
    ("LQTS", "long QT syndrome",
     ["Family history of LQTS, screening ECG.", "LQTS type 1, on a beta blocker.",
      "Fainting while swimming, query LQTS."]),
    ("CHB", "complete heart block",
     ["Congenital CHB, maternal antibodies.", "CHB after surgery, pacing wires used.", "Permanent pacemaker for CHB."]),
    ("KD", "Kawasaki disease",
     ["Five days of fever, query KD.", "KD treated with immunoglobulin.", "Coronary aneurysms after KD."]),
    ("ARF", "acute rheumatic fever",
     ["Migratory arthritis, query ARF.", "ARF with carditis.", "Monthly penicillin after ARF."]),
    ("RHD", "rheumatic heart disease",
     ["RHD with mitral regurgitation.", "RHD screening in school children.", "Chronic RHD, valve repair planned."]),
    ("IE", "infective endocarditis",
     ["Fever and a new murmur, query IE.", "IE on the repaired valve.", "Six weeks of antibiotics for IE."]),
    ("HCM", "hypertrophic cardiomyopathy",
     ["Family screening for HCM.", "HCM with outflow obstruction.", "Teenager with HCM, no competitive sport."]),
    ("DCM", "dilated cardiomyopathy",
     ["Infant with DCM, poor function.", "DCM after myocarditis.", "DCM, listed for transplant."]),
    ("TTE", "transthoracic echocardiogram",
     ["TTE shows good biventricular function.", "TTE before discharge.", "Limited windows on TTE."]),
    ("TOE", "transoesophageal echocardiogram",
     ["Intraoperative TOE confirmed a good repair.", "TOE to look for vegetations.", "TOE under anaesthetic."]),
    ("CPB", "cardiopulmonary bypass",
     ["Two hours on CPB.", "Weaned from CPB without difficulty.", "CPB time 95 minutes."]),
    ("ECMO", "extracorporeal membrane oxygenation",
     ["Placed on ECMO after cardiac arrest.", "ECMO decannulation on day five.", "Bridge to transplant on ECMO."]),
    ("PICU", "paediatric intensive care unit",
     ["Admitted to PICU after surgery.", "Two nights on PICU, then the ward.", "Transferred to PICU for inotropes."]),
    ("BT", "Blalock-Taussig",
     ["Modified BT shunt in the neonatal period.", "BT shunt blocked, urgent catheter.",
      "Saturations 80% with a BT shunt."]),
    ("TCPC", "total cavopulmonary connection",
     ["TCPC completed at four years.", "Fenestrated TCPC.", "Exercise testing after TCPC."]),
    ("PVR", "pulmonary vascular resistance",
     ["High PVR at catheter.", "PVR acceptable for the Glenn.", "PVR fell with nitric oxide."]),
    ("DORV", "double outlet right ventricle",
     ["DORV with subaortic VSD.", "DORV repair at three months.", "Antenatal scan suggests DORV."]),
    ("IAA", "interrupted aortic arch",
     ["IAA with a large VSD.", "IAA type B, check for 22q11 deletion.", "Neonatal repair of IAA."]),
    ("TAPVR", "total anomalous pulmonary venous return",
     ["Obstructed TAPVR, emergency surgery.", "Supracardiac TAPVR.", "Cyanosed newborn, query TAPVR."]),
    ("MAPCAs", "major aortopulmonary collateral arteries",
     ["Pulmonary atresia with MAPCAs.", "MAPCAs unifocalised at surgery.", "CT angiogram to map the MAPCAs."]),
    ("BAV", "bicuspid aortic valve",
     ["BAV with mild stenosis.", "BAV found at a sports screening.", "BAV, screen the siblings."]),
    ("PPHN", "persistent pulmonary hypertension of the newborn",
     ["Term baby with PPHN after meconium.", "PPHN on nitric oxide.", "PPHN, structurally normal heart."]),
    ("CCHD", "critical congenital heart disease",
     ["Pulse oximetry screening for CCHD.", "Failed screen, CCHD excluded by echo.",
      "CCHD needs surgery in the first weeks."]),
    ("CHD", "congenital heart disease",
     ["Adult CHD clinic transfer at sixteen.", "Family history of CHD.", "CHD is the commonest birth defect."]),
    ("RVOT", "right ventricular outflow tract",
     ["RVOT obstruction in TOF.", "RVOT stent as palliation.", "Muscle bundles in the RVOT."]),
    ("LVOT", "left ventricular outflow tract",
     ["LVOT gradient 50 mmHg.", "LVOT obstruction after AVSD repair.", "Narrow LVOT on echo."]),
    ("JET", "junctional ectopic tachycardia",
     ["JET after the VSD repair.", "JET controlled with cooling.", "Postoperative JET on day one."]),
    ("PAB", "pulmonary artery banding",
     ["PAB for a large VSD in a small baby.", "PAB tightened at day ten.", "PAB before biventricular repair."]),
    ("SVC", "superior vena cava",
     ["Left SVC draining to the coronary sinus.", "SVC obstruction after the Glenn.",
      "Sinus venosus defect near the SVC."]),
    ("IVC", "inferior vena cava",
     ["Interrupted IVC with azygos continuation.", "IVC diameter normal.", "Fontan conduit from the IVC."]),
    ("BNP", "B-type natriuretic peptide",
     ["BNP raised in heart failure.", "BNP fell after diuretics.", "Check BNP at the next clinic."]),
]
TERMINOLOGY: dict[str, list[tuple[str, str, list[str]]]] = {
    "general": GENERAL, "medical": MEDICAL, "paediatric_cardiology": PAEDIATRIC_CARDIOLOGY}

# Wrappers around a clause, disjoint between splits: {c} clause, {name} a first name, {last} a surname,
# {age}/{sex} an adult, {child}/{kid} a child's age and sex, {bed} a number.
WRAPPERS: dict[str, dict[str, list[str]]] = {
    "general": {
        "train": ['{name} wrote in an email: "{c}"', 'Text message from {name}: "{c}"',
                  'A sticky note on the desk says: "{c}"', 'In the group chat, {name} posted: "{c}"', '{c}',
                  'From a letter by {name}: "{c}"', 'Overheard in the office: "{c}"',
                  'Message on the noticeboard: "{c}"'],
        "validation": ['A voicemail from {name} says: "{c}"', 'In the meeting notes: "{c}"',
                       '{name} said on the phone: "{c}"'],
        "test": ['A postcard from {name} reads: "{c}"', 'Someone wrote on the whiteboard: "{c}"',
                 'In a forum post, {name} wrote: "{c}"'],
    },
    "medical": {
        "train": ['Clinic note: "{c}"', 'Ward round, bed {bed}: "{c}"', 'GP referral letter: "{c}"',
                  'Nursing handover: "{c}"', 'Discharge summary, {age}-year-old {sex}: "{c}"',
                  'Emergency department triage note: "{c}"', 'Dr {last} dictated: "{c}"', '{c}'],
        "validation": ['Outpatient letter: "{c}"', 'Pharmacy note: "{c}"', 'Night shift handover, bed {bed}: "{c}"'],
        "test": ["Medical student's case summary: \"{c}\"", 'Telephone advice log: "{c}"',
                 'Consultant review, {age}-year-old {sex}: "{c}"'],
    },
    "paediatric_cardiology": {
        "train": ['Paediatric cardiology clinic letter: "{c}"', 'Echo report, {child} {kid}: "{c}"',
                  'Cardiac ward handover: "{c}"', 'Neonatal unit note: "{c}"', 'Cardiac surgery list: "{c}"',
                  'Fetal medicine referral: "{c}"', 'Dr {last}, paediatric cardiologist, wrote: "{c}"', '{c}'],
        "validation": ['Cardiac MDT minutes: "{c}"', "Ward round on the children's heart unit: \"{c}\"",
                       'Joint clinic note, {child} {kid}: "{c}"'],
        "test": ['Cardiac catheter lab note: "{c}"', 'Transfer letter from the district hospital: "{c}"',
                 "Paediatric registrar's summary, {child} {kid}: \"{c}\""],
    },
}
CHILD_AGES = ["2-day-old", "3-week-old", "4-month-old", "9-month-old", "2-year-old", "6-year-old", "11-year-old",
              "15-year-old"]
# fmt: on


# ---- entities ------------------------------------------------------------------------------
def _organisations() -> dict[str, list[str]]:
    companies = [f"{brand} {suffix}" for brand in BRANDS for suffix in COMPANY_SUFFIXES]
    hospitals = [p.format(town=t, saint=s) for p in HOSPITAL_PATTERNS for t in TOWNS for s in SAINTS]
    universities = [p.format(town=t) for p in UNIVERSITY_PATTERNS for t in TOWNS]
    return {"OC": sorted(set(companies)), "OH": sorted(set(hospitals)), "OU": sorted(set(universities))}


SLOT = re.compile(r"\{(P|p|OC|OH|OU|O|L)(\d)\}|\{(when|category)\}")
SLOT_ENTITY = re.compile(r"\{(P|p|OC|OH|OU|O|L)\d\}")


def make_sentence(rng: random.Random, template: str, orgs: dict[str, list[str]]) -> dict[str, object]:
    """Fill one template; entities are listed per type in order of appearance, all distinct."""
    found: dict[str, list[str]] = {t: [] for t in ENTITY_TYPES}
    used: set[str] = set()

    def pick(pool: list[str]) -> str:
        while True:
            value = rng.choice(pool)
            if value not in used:
                used.add(value)
                return value

    def person() -> str:
        while True:
            name = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
            # a first or last name shared with another person in the sentence would blur the labels
            if not any(part in other.split() for other in used for part in name.split()):
                used.add(name)
                return name

    def fill(match: re.Match[str]) -> str:
        kind, filler = match.group(1), match.group(3)
        if filler == "when":
            return rng.choice(WHEN)
        if filler == "category":
            return rng.choice(sorted(CATEGORIES))
        if kind in ("P", "p"):
            name = person()
            found["person"].append(name)
            if kind == "P" and rng.random() < 0.25:
                return f"{rng.choice(PERSON_TITLES)} {name}"
            return name
        if kind == "L":
            place = pick(REAL_PLACES if rng.random() < 0.2 else TOWNS)
            found["location"].append(place)
            return place
        org = pick(orgs[kind] if kind != "O" else orgs[rng.choice(sorted(orgs))])
        found["organisation"].append(org)
        return org

    text = SLOT.sub(fill, template)  # re.sub fills left to right, so lists follow order of appearance
    target = "; ".join(f"{t}: {', '.join(found[t]) or 'none'}" for t in ENTITY_TYPES)
    return {"text": text, "entities": target, **found}


def generate_entities(seed: int) -> dict[str, list[dict[str, object]]]:
    """All entity splits; sentences are unique across splits."""
    rng = random.Random(f"{seed}:entities")
    orgs = _organisations()
    pools = {empty: [t for t in ENTITY_TEMPLATES if bool(SLOT_ENTITY.search(t)) != empty] for empty in (False, True)}
    seen: set[str] = set()
    out: dict[str, list[dict[str, object]]] = {}
    next_id = 1
    for split, size in ENTITY_SPLITS.items():
        rows = []
        while len(rows) < size:
            empty = rng.random() < EMPTY_RATE
            while True:  # redraw on a duplicate sentence, keeping the entity-free decision
                row = make_sentence(rng, rng.choice(pools[empty]), orgs)
                if row["text"] not in seen:
                    break
            seen.add(str(row["text"]))
            rows.append({"id": f"ent-{next_id:05d}", **row})
            next_id += 1
        out[split] = rows
    return out


# ---- terminology ---------------------------------------------------------------------------
def collisions() -> dict[tuple[str, str], list[str]]:
    """(domain, term) -> "other_domain: other expansion" for each other domain where the term means something else."""
    meanings: dict[str, dict[str, str]] = {d: {t: e for t, e, _ in terms} for d, terms in TERMINOLOGY.items()}
    out: dict[tuple[str, str], list[str]] = {}
    for domain, terms in meanings.items():
        for term, expansion in terms.items():
            out[(domain, term)] = [
                f"{other}: {theirs[term]}" for other, theirs in meanings.items()
                if other != domain and term in theirs and theirs[term].lower() != expansion.lower()
            ]
    return out


def check_terms() -> None:
    """Each clause names its term as a word and does not give the expansion away; terms are unique per domain."""
    for domain, terms in TERMINOLOGY.items():
        names = [t for t, _, _ in terms]
        assert len(names) == len(set(names)), f"{domain}: duplicate terms"
        assert 40 <= len(names) <= TERM_SPLITS["test"], f"{domain}: {len(names)} terms"
        for term, expansion, clauses in terms:
            assert len(clauses) == 3, f"{domain} {term}: needs three clauses"
            for clause in clauses:
                assert re.search(rf"(?<![\w&]){re.escape(term)}(?![\w&])", clause), f"{domain} {term}: {clause!r}"
                assert expansion.lower() not in clause.lower(), f"{domain} {term}: expansion in {clause!r}"


def wrap(rng: random.Random, wrapper: str, clause: str) -> str:
    return wrapper.format(
        c=clause, name=rng.choice(FIRST_NAMES), last=rng.choice(LAST_NAMES), bed=rng.randint(1, 30),
        age=rng.randint(19, 92), sex=rng.choice(["man", "woman"]), child=rng.choice(CHILD_AGES),
        kid=rng.choice(["boy", "girl"]),
    )


def generate_terms(seed: int, domain: str) -> dict[str, list[dict[str, object]]]:
    """One domain's splits: every term in every split; train from clauses 0-1, validation/test from clause 2."""
    rng = random.Random(f"{seed}:terms:{domain}")
    terms = TERMINOLOGY[domain]
    clash = collisions()
    seen: set[str] = set()
    out: dict[str, list[dict[str, object]]] = {}
    next_id = 1
    for split, size in TERM_SPLITS.items():
        # every term once per round; in held-out splits the extra rows go to colliding terms first
        order = list(range(len(terms)))
        counts = Counter({i: size // len(terms) for i in order})
        extra = size - sum(counts.values())
        ranked = sorted(order, key=lambda i: (not clash[(domain, terms[i][0])], rng.random()))
        for i in (ranked if split != "train" else rng.sample(order, len(order)))[:extra]:
            counts[i] += 1
        clauses = [0, 1] if split == "train" else [2]
        rows = []
        for i in order:
            term, expansion, term_clauses = terms[i]
            made = 0
            for _attempt in range(1000):
                if made == counts[i]:
                    break
                context = wrap(rng, rng.choice(WRAPPERS[domain][split]), term_clauses[rng.choice(clauses)])
                if context in seen:
                    continue
                seen.add(context)
                made += 1
                rows.append({"domain": domain, "term": term, "expansion": expansion, "context": context,
                             "collides_with": clash[(domain, term)]})
            assert made == counts[i], f"{domain} {split} {term}: only {made} distinct contexts"
        rng.shuffle(rows)
        out[split] = [{"id": f"{domain[:3]}-{next_id + k:05d}", **row} for k, row in enumerate(rows)]
        next_id += len(rows)
    return out


def write_jsonl(folder: Path, split: str, rows: list[dict[str, object]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    check_terms()

    print("| split | rows | with person | with organisation | with location | no entity | entities per row |")
    print("|---|---|---|---|---|---|---|")
    for split, rows in generate_entities(args.seed).items():
        write_jsonl(args.out / "entities", split, rows)
        has = {t: sum(bool(r[t]) for r in rows) for t in ENTITY_TYPES}
        empty = sum(not any(r[t] for t in ENTITY_TYPES) for r in rows)
        per_row = sum(len(r[t]) for r in rows for t in ENTITY_TYPES) / len(rows)  # type: ignore[arg-type]
        print(f"| {split} | {len(rows)} | {has['person']} | {has['organisation']} | {has['location']} | {empty} | "
              f"{per_row:.2f} |")

    print("\n| domain | terms | colliding terms | train | validation | test | rows per term (train) |")
    print("|---|---|---|---|---|---|---|")
    for domain in TERMINOLOGY:
        splits = generate_terms(args.seed, domain)
        for split, rows in splits.items():
            write_jsonl(args.out / "terminology" / domain, split, rows)
        per_term = Counter(r["term"] for r in splits["train"])
        colliding = sorted({str(r["term"]) for r in splits["train"] if r["collides_with"]})
        print(f"| {domain} | {len(TERMINOLOGY[domain])} | {len(colliding)} ({', '.join(colliding)}) | "
              f"{len(splits['train'])} | {len(splits['validation'])} | {len(splits['test'])} | "
              f"{min(per_term.values())}-{max(per_term.values())} |")
    print(f"wrote entities/ and terminology/ under {args.out}")


if __name__ == "__main__":
    main()
