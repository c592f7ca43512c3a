// Demo data for the reading sync: 500 sensor readings marked "ingested", and a trickle
// of new ones is left to the user (`make demo-readings`). Runs once, on the first start
// of the mongo container (docker-entrypoint-initdb.d).
const obs = db.getSiblingDB("observability");
const now = Date.now();
const docs = [];
for (let i = 0; i < 500; i++) {
  docs.push({
    status: "ingested",
    sensor: { id: `probe-${i % 12}`, site: "plant-3" },
    timestamp: new Date(now - (500 - i) * 60000),
    values: { temperature: 18 + (i % 70) / 10, humidity: 40 + (i % 30) },
    unit_system: "metric",
  });
}
obs.readings.insertMany(docs);
obs.readings.createIndex({ status: 1, _id: 1 });
print(`seeded ${docs.length} readings`);
