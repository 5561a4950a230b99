// Parse and validate an AsyncAPI document; print its diagnostics as JSON, exit 1 on any error.
import { readFile } from "node:fs/promises";
import { Parser, DiagnosticSeverity } from "@asyncapi/parser";

const text = await readFile(process.argv[2], "utf8");
const { document, diagnostics } = await new Parser().parse(text);
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
console.log(JSON.stringify({ parsed: document !== undefined, errors: errors.map((d) => ({ code: d.code, message: d.message, path: d.path })) }));
process.exit(document !== undefined && errors.length === 0 ? 0 : 1);
