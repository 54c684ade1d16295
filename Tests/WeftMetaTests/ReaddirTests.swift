#if canImport(Glibc)
import Glibc
#endif
import Foundation
import WeftTestSupport
import XCTest
import WeftProto
@testable import WeftMeta

/// readdir: "." and "..", name order, paging with `after`/`limit`, attributes of each entry.
final class ReaddirTests: MetaStoreTestCase {
    /// 2500 names, many of them sorting right around "." (0x2E) and ".." in byte order:
    /// "-" (0x2D) sorts before ".", "/" cannot occur, "0" after; plus bytes 0x01 and 0xFF.
    private func awkwardNames() -> [[UInt8]] {
        var names: Set<[UInt8]> = [bytes("-"), bytes(".-"), bytes("..."), bytes("..-"), bytes(".0"), bytes("..0"),
                                   bytes(".a"), bytes("..a"), bytes("-."), bytes("-.."), [0x01], [0xFF], [0x2E, 0xFF],
                                   [0x2E, 0x2E, 0x01], [0x2E, 0x01]]
        var random = SeededRandom(seed: 2500)
        let alphabet: [UInt8] = [0x2D, 0x2E, 0x2E, 0x2E, 0x30, 0x41, 0x61, 0x7A, 0x01, 0xFF]
        while names.count < 2500 {
            let length = Int.random(in: 1...6, using: &random)
            var name = (0..<length).map { _ in alphabet.randomElement(using: &random)! }
            if name == [0x2E] || name == [0x2E, 0x2E] { name.append(0x2D) }
            names.insert(name)
        }
        return names.sorted { $0.lexicographicallyPrecedes($1) }
    }

    func testEmptyDirectoryHasDotAndDotDot() throws {
        let directory = try makeDirectory("d")
        let page = try store.readdir(Callers.root, ino: directory.ino, after: nil, limit: 100)
        XCTAssertEqual(page.map(\.name), [[0x2E], [0x2E, 0x2E]])
        XCTAssertEqual(page[0].ino, directory.ino)
        XCTAssertEqual(page[0].attributes, try store.getattr(directory.ino))
        XCTAssertEqual(page[1].ino, root)
        XCTAssertEqual(page[1].attributes.ino, root)
        XCTAssertEqual(try store.readdir(Callers.root, ino: directory.ino, after: [0x2E, 0x2E], limit: 100), [])
        let rootPage = try store.readdir(Callers.root, ino: root, after: nil, limit: 100)
        XCTAssertEqual(rootPage.first(where: { $0.name == [0x2E, 0x2E] })?.ino, root)
    }

    func testEntriesCarryTheirAttributes() throws {
        let file = try makeFile("file")
        let directory = try makeDirectory("dir")
        let link = try store.symlink(Callers.root, parent: root, name: bytes("link"), target: bytes("file"))
        let page = try store.readdir(Callers.root, ino: root, after: nil, limit: 100)
        XCTAssertEqual(page.map { String(decoding: $0.name, as: UTF8.self) }, [".", "..", "dir", "file", "link"])
        XCTAssertEqual(page[2].attributes, try store.getattr(directory.ino))
        XCTAssertEqual(page[3].attributes, file)
        XCTAssertEqual(page[4].attributes, link)
        XCTAssertEqual(page[4].ino, link.ino)
    }

    func testReaddirOfANonDirectory() throws {
        let file = try makeFile("f")
        XCTAssertErrno(ENOTDIR, try store.readdir(Callers.root, ino: file.ino, after: nil, limit: 10))
        XCTAssertErrno(ENOENT, try store.readdir(Callers.root, ino: 6060, after: nil, limit: 10))
    }

    func testPagingReturnsEveryEntryExactlyOnce() throws {
        let directory = try makeDirectory("big")
        let expected = awkwardNames()
        var inodes: [[UInt8]: InodeID] = [:]
        for name in expected {
            inodes[name] = try store.create(Callers.root, parent: directory.ino, name: name, mode: FileType.regular | 0o644,
                                            rdev: 0, umask: 0, exclusive: true).ino
        }
        for limit in [3, 7, 100, 1024, 4096, 10_000] {
            var seen: [[UInt8]] = []
            var after: [UInt8]? = nil
            var pages = 0
            while true {
                let page = try store.readdir(Callers.root, ino: directory.ino, after: after, limit: limit)
                XCTAssertLessThanOrEqual(page.count, min(limit, Limits.readdirPageMaxEntries), "limit \(limit)")
                guard let last = page.last else { break }
                for entry in page where entry.name != [0x2E] && entry.name != [0x2E, 0x2E] {
                    XCTAssertEqual(entry.ino, inodes[entry.name], "limit \(limit)")
                    XCTAssertEqual(entry.attributes.ino, entry.ino)
                    seen.append(entry.name)
                }
                if after == nil {
                    XCTAssertEqual(Array(page.prefix(2).map(\.name)), [[0x2E], [0x2E, 0x2E]], "limit \(limit)")
                }
                after = last.name
                pages += 1
                XCTAssertLessThan(pages, 3000, "paging does not end")
                if pages >= 3000 { break }
            }
            XCTAssertEqual(seen.count, expected.count, "limit \(limit): every entry once")
            XCTAssertEqual(seen, expected, "limit \(limit): in byte order, no repeats, none missing")
        }
    }

    func testPagingSurvivesRemovalOfThePageBoundary() throws {
        let directory = try makeDirectory("d")
        for index in 0..<50 { try makeFile(String(format: "f%02d", index), in: directory.ino) }
        let first = try store.readdir(Callers.root, ino: directory.ino, after: nil, limit: 12)
        let last = first.last!.name
        XCTAssertEqual(last, bytes("f09"))
        try store.unlink(Callers.root, parent: directory.ino, name: last)
        try store.unlink(Callers.root, parent: directory.ino, name: bytes("f10"))
        let next = try store.readdir(Callers.root, ino: directory.ino, after: last, limit: 3)
        XCTAssertEqual(next.map(\.name), [bytes("f11"), bytes("f12"), bytes("f13")])
    }

    func testFirstPageRespectsSmallLimits() throws {
        // HubAPI.readdir promises "at most `limit`" entries per page.
        // BUG (Sources/WeftMeta/MetaStore+Namespace.swift, MetaStore.readdir): the first page
        // (after == nil) always holds "." and "..", and the scan then appends one more real entry
        // before it checks the limit, so limit 1 or 2 gives 3 entries.
        let directory = try makeDirectory("d")
        for name in ["a", "b", "c"] { try makeFile(name, in: directory.ino) }
        for limit in [1, 2] {
            let page = try store.readdir(Callers.root, ino: directory.ino, after: nil, limit: limit)
            XCTAssertLessThanOrEqual(page.count, limit, "limit \(limit) gave \(page.map { String(decoding: $0.name, as: UTF8.self) })")
        }
        XCTAssertEqual(try store.readdir(Callers.root, ino: directory.ino, after: nil, limit: 3).count, 3)
        XCTAssertEqual(try store.readdir(Callers.root, ino: directory.ino, after: bytes("a"), limit: 1).map(\.name),
                       [bytes("b")])
    }
}
