"""The package's rooms and the order between them: every module imports only from its own room and the rooms above it,
no two modules import each other (directly or round a circle), and only the command line and the package's top level
import inside functions (to stay cheap to import). Read from the source with `ast`, so an import inside a function counts
as much as one at the top, and nothing is imported to check it."""
import ast, shutil
from dataclasses import dataclass
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'dinoqpm'

# Top to bottom, in the order the data flows. A module may import from its own room and from the rooms above it; rooms in
# the same row stand side by side and may not import each other. A room is a subpackage or a single module.
LAYERS = [
    ['dinoqpm.numerics'],                  # CPU numerics pins, read before torch starts
    ['dinoqpm.core'],                      # paths, errors, atomic writes, provenance
    ['dinoqpm.config'],                    # the frozen run configuration
    ['dinoqpm.distributed'],               # torchrun ranks and devices
    ['dinoqpm.data'],                      # readers, SynthBirds, your own folders; the registry of datasets
    ['dinoqpm.features'],                  # frozen backbones and their weights; the token cache
    ['dinoqpm.model', 'dinoqpm.qp'],       # the adapter and its losses | the QP (no torch); neither imports the other
    ['dinoqpm.train'],                     # both training phases, checkpoints, convergence
    ['dinoqpm.evaluation'],                # metrics, maps, one-pass evaluation, rendering, tables
    ['dinoqpm.pipeline'],                  # run directories, their lock, `run_qpm`
    ['dinoqpm.baselines'],                 # Table 1's comparison rows
    ['dinoqpm.share'],                     # export format, inference, explorer, export (never baselines, paper or cli)
    ['dinoqpm.paper'],                     # the paper's tables and figures
    ['dinoqpm.cli'],                       # the command line
    ['dinoqpm.__main__'],                  # `python -m dinoqpm`
    ['dinoqpm',                            # the package's top level: `dinoqpm.load_pretrained`, may reach into any room
     'dinoqpm._modidx'],                   # nbdev's index of names (imports nothing)
]
# where an import inside a function is allowed, and why
LAZY_IMPORTS = {
    'dinoqpm': '`import dinoqpm` stays cheap (no torch): `load_pretrained` is resolved on first use',
    'dinoqpm.cli': 'each command imports its rooms when it runs: `dinoqpm --help` needs neither torch nor any room',
}


@dataclass(frozen=True)
class Import:
    source: str          # the importing module
    target: str          # the imported module (a package's `__init__` is the package's name)
    path: str            # file, relative to the repository
    line: int
    in_function: bool


def module_name(py: Path, root: Path) -> str:
    parts = list(py.relative_to(root).with_suffix('').parts)
    if parts[-1] == '__init__': parts = parts[:-1]
    return '.'.join(parts)


def _resolve(node: ast.ImportFrom, source: str, is_package: bool) -> str:
    "The absolute module an `ImportFrom` names (relative imports resolved against `source`)."
    if not node.level: return node.module or ''
    base = source.split('.') if is_package else source.split('.')[:-1]
    base = base[:len(base) - (node.level - 1)]
    return '.'.join(base + ([node.module] if node.module else []))


def scan(root: Path, package: str = PACKAGE) -> tuple:
    "`(modules, imports)` of the package under `root`: every module's name, and every import of one of them."
    files = {module_name(p, root): p for p in sorted((root / package).rglob('*.py')) if '__pycache__' not in p.parts}
    modules = set(files)
    imports = []
    for source, py in files.items():
        tree = ast.parse(py.read_text(), filename=str(py))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import): targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = _resolve(node, source, py.name == '__init__.py')
                # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg (its `__init__`)
                targets = [f'{mod}.{a.name}' if f'{mod}.{a.name}' in modules else mod for a in node.names]
            else: continue
            for t in dict.fromkeys(targets):
                while t and t not in modules and '.' in t: t = t.rsplit('.', 1)[0]   # `import a.b.c`: the deepest module
                if t in modules and t != source:
                    imports.append(Import(source, t, str(py.relative_to(root)), node.lineno, id(node) not in top))
    return modules, imports


def room_of(module: str, layers=LAYERS) -> tuple:
    """`(row, room)` of a module: its room is the longest room name that is the module or a package above it (the
    package itself is a room of its top level only, so a new module outside every room is named, not let through)."""
    best = None
    for row, rooms in enumerate(layers):
        for room in rooms:
            inside = module == room or (module.startswith(room + '.') and '.' in room)
            if inside and (best is None or len(room) > len(best[1])):
                best = (row, room)
    if best is None: raise LookupError(f'{module} is in no room of LAYERS: add it to its room (tests/test_layers.py)')
    return best


def upward_imports(imports, layers=LAYERS) -> list:
    "Every import into a room below the importer's, or into another room of its own row."
    bad = []
    for i in imports:
        (r_src, room_src), (r_dst, room_dst) = room_of(i.source, layers), room_of(i.target, layers)
        if r_dst > r_src or (r_dst == r_src and room_dst != room_src):
            where = 'below it' if r_dst > r_src else 'beside it'
            bad.append(f'{i.path}:{i.line}: {i.source} ({room_src}) imports {i.target} ({room_dst}, {where})')
    return bad


def import_cycles(imports) -> list:
    "Every circle of modules that import each other, as `a -> b -> ... -> a` (Tarjan's strongly connected components)."
    graph = {}
    for i in imports: graph.setdefault(i.source, set()).add(i.target)
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []
    def visit(v):
        index[v] = low[v] = len(index); stack.append(v); on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on_stack: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on_stack.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: sccs.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return [' -> '.join(_circle(comp, graph)) for comp in sccs]


def _circle(comp, graph) -> list:
    "One circle through the component's first module, for the message."
    start, inside = comp[0], set(comp)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in inside)
        if start in nxt: return path + [start]
        step = next((w for w in nxt if w not in seen), nxt[0])
        if step in seen: return path + [step]
        path.append(step); seen.add(step)


def lazy_imports(imports, allowed=LAZY_IMPORTS) -> list:
    "Imports of package modules inside functions, outside the modules allowed to have them."
    return [f'{i.path}:{i.line}: {i.source} imports {i.target} inside a function' for i in imports
            if i.in_function and i.source not in allowed]


@pytest.fixture(scope='module')
def package():
    return scan(ROOT)


def test_every_module_is_in_a_room(package):
    modules, _ = package
    for m in sorted(modules): room_of(m)


def test_no_import_runs_up_the_layers(package):
    bad = upward_imports(package[1])
    assert not bad, 'imports against the layer order (tests/test_layers.py LAYERS):\n' + '\n'.join(bad)


def test_no_import_cycle(package):
    cycles = import_cycles(package[1])
    assert not cycles, 'modules that import each other:\n' + '\n'.join(cycles)


def test_imports_at_the_top(package):
    bad = lazy_imports(package[1])
    assert not bad, ('import at the top of the module (only ' + ', '.join(LAZY_IMPORTS) + ' import lazily):\n' + '\n'.join(bad))


def test_relative_imports_resolve(tmp_path):
    "`from . import x`, `from ..a import b` and `import a.b` name the modules Python imports."
    pkg = tmp_path / 'pkg'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('def f():\n    from .sub import leaf\n')
    (pkg / 'low.py').write_text('X = 1\n')
    (pkg / 'sub' / '__init__.py').write_text('from .leaf import Y\n')
    (pkg / 'sub' / 'leaf.py').write_text('from ..low import X\nfrom .. import low\nimport pkg.sub\nY = 2\n')
    _, imports = scan(tmp_path, 'pkg')
    got = {(i.source, i.target, i.line, i.in_function) for i in imports}
    assert got == {('pkg', 'pkg.sub.leaf', 2, True), ('pkg.sub', 'pkg.sub.leaf', 1, False),
                   ('pkg.sub.leaf', 'pkg.low', 1, False), ('pkg.sub.leaf', 'pkg.low', 2, False),
                   ('pkg.sub.leaf', 'pkg.sub', 3, False)}, got


def test_planted_violations_are_caught(tmp_path):
    "A copy of the package with an import up the layers, a circle and a function-level import planted: each is named."
    shutil.copytree(ROOT / PACKAGE, tmp_path / PACKAGE, ignore=shutil.ignore_patterns('__pycache__'))
    readers = tmp_path / PACKAGE / 'data' / 'readers.py'
    n = len(readers.read_text().splitlines())
    readers.write_text(readers.read_text() + '\nfrom ..qp import solve_qp\nfrom .folder import scan_folder\n'
                       'def _late():\n    from ..model import DinoQPMModel\n')
    _, imports = scan(tmp_path)
    up = upward_imports(imports)
    assert up == [f'{PACKAGE}/data/readers.py:{n + 2}: dinoqpm.data.readers (dinoqpm.data) imports dinoqpm.qp (dinoqpm.qp, below it)',
                  f'{PACKAGE}/data/readers.py:{n + 5}: dinoqpm.data.readers (dinoqpm.data) imports dinoqpm.model '
                  f'(dinoqpm.model, below it)'], up
    assert import_cycles(imports) == ['dinoqpm.data.folder -> dinoqpm.data.readers -> dinoqpm.data.folder'], import_cycles(imports)
    assert lazy_imports(imports) == [f'{PACKAGE}/data/readers.py:{n + 5}: dinoqpm.data.readers imports dinoqpm.model inside a function']


def test_rooms_side_by_side_may_not_import_each_other():
    "On a made-up graph: a row's rooms are independent, a longer circle is reported, the layer order is the list's."
    layers = [['p.a'], ['p.b', 'p.c'], ['p.d']]
    imports = [Import('p.c', 'p.b', 'p/c.py', 3, False), Import('p.d', 'p.a', 'p/d.py', 1, False),
               Import('p.a', 'p.d', 'p/a.py', 7, True)]
    assert upward_imports(imports, layers) == ['p/c.py:3: p.c (p.c) imports p.b (p.b, beside it)',
                                               'p/a.py:7: p.a (p.a) imports p.d (p.d, below it)']
    ring = [Import('p.x', 'p.y', '', 1, False), Import('p.y', 'p.z', '', 1, False), Import('p.z', 'p.x', '', 1, False)]
    assert import_cycles(ring) == ['p.x -> p.y -> p.z -> p.x']
    with pytest.raises(LookupError, match='p.e is in no room'): room_of('p.e', layers)
    with pytest.raises(LookupError, match='dinoqpm.newthing is in no room'): room_of('dinoqpm.newthing')
    assert room_of('dinoqpm.data.folder') == (4, 'dinoqpm.data') and room_of('dinoqpm')[1] == 'dinoqpm'
