import Foundation
import WeftProto
import XCTest
@testable import WeftVFS

final class FIFOTests: XCTestCase {
    func testFirstInFirstOutAcrossCompactions() {
        var queue = FIFO<Int>()
        XCTAssertNil(queue.popFirst())
        XCTAssertNil(queue.fromEnd(0))
        var expected = 0
        for value in 0..<5000 {
            queue.append(value)
            if value % 3 == 2 {  // pops two of every three: the front moves past the compaction point
                XCTAssertEqual(queue.popFirst(), expected)
                XCTAssertEqual(queue.popFirst(), expected + 1)
                expected += 2
            }
            XCTAssertEqual(queue.count, value + 1 - expected)
            XCTAssertEqual(queue.fromEnd(0), value)
        }
        XCTAssertEqual(queue.fromEnd(queue.count - 1), expected, "the front, counted from the end")
        XCTAssertNil(queue.fromEnd(queue.count), "past the front")
        XCTAssertNil(queue.fromEnd(-1))
        while let value = queue.popFirst() {
            XCTAssertEqual(value, expected)
            expected += 1
        }
        XCTAssertEqual(expected, 5000)
        XCTAssertEqual(queue.count, 0)
    }
}

/// Which own unlinks and renames overlapped on a same name (SPEC.md §12.6): only those need
/// every kept file marked stale.
final class NamesChangingTests: XCTestCase {
    private func key(_ name: String, in parent: UInt64 = 1) -> NameKey { NameKey(parent: parent, name: Array(name.utf8)) }

    func testOnlyChangesOfASameNameThatOverlapClash() {
        var changing = NamesChanging()
        // Different names, overlapping: no clash.
        let a = changing.begin([key("a")]), b = changing.begin([key("b")])
        XCTAssertTrue(changing.end(a, [key("a")]))
        XCTAssertTrue(changing.end(b, [key("b")]))
        // The same name in another directory is another name.
        let here = changing.begin([key("x", in: 1)]), there = changing.begin([key("x", in: 2)])
        XCTAssertTrue(changing.end(there, [key("x", in: 2)]))
        XCTAssertTrue(changing.end(here, [key("x", in: 1)]))
        // A rename of c over a while an unlink of a is under way: both clash, and so does a
        // later change of c that overlaps the rename, even after the unlink ended.
        let unlinkA = changing.begin([key("a")])
        let renameCA = changing.begin([key("c"), key("a")])
        XCTAssertFalse(changing.end(unlinkA, [key("a")]))
        let unlinkC = changing.begin([key("c")])
        XCTAssertFalse(changing.end(renameCA, [key("c"), key("a")]))
        XCTAssertFalse(changing.end(unlinkC, [key("c")]))
        // Nothing under way any more: a new change is alone; a rename of a name onto itself
        // does not clash with itself.
        let again = changing.begin([key("a")])
        XCTAssertTrue(changing.end(again, [key("a")]))
        let onto = changing.begin([key("d"), key("d")])
        XCTAssertTrue(changing.end(onto, [key("d"), key("d")]))
        XCTAssertTrue(changing.isEmpty)
    }
}

/// The entry under which each file was last given to the kernel (SPEC.md §12.6, "A rename
/// across another agent's rename").
final class GivenNamesTests: XCTestCase {
    private func key(_ name: String, in parent: UInt64 = 1) -> NameKey { NameKey(parent: parent, name: Array(name.utf8)) }

    func testAnotherEntryOfTheSameFileIsReportedUntilTheKernelDropsIt() {
        var given = GivenNames()
        XCTAssertNil(given.other(7, than: key("a")))
        given.gave(7, key("a"), covered: false, now: 5)
        XCTAssertNil(given.other(7, than: key("a")), "the same entry")
        XCTAssertNil(given.other(8, than: key("b")), "another file")
        let other = given.other(7, than: key("b"))
        XCTAssertEqual(other?.key, key("a"))
        XCTAssertEqual(other?.covered, false)
        XCTAssertEqual(other?.ns, 5)
        XCTAssertEqual(given.other(7, than: key("a", in: 2))?.key, key("a"), "same name, other directory")
        given.dropped(7, key("b"))
        XCTAssertEqual(given.other(7, than: key("b"))?.covered, false, "a drop of another entry changes nothing")
        given.dropped(7, key("a"))
        XCTAssertEqual(given.other(7, than: key("b"))?.covered, true, "dropped: no longer held stale")
        given.gave(7, key("b"), covered: true, now: 6)
        XCTAssertEqual(given.other(7, than: key("a"))?.key, key("b"), "the latest entry counts")
    }

    /// The kernel moves its entry itself after this agent's own rename; a link keeps both.
    func testOwnRenamesMoveTheRecordAndLinksKeepTheEarlierEntry() {
        var given = GivenNames()
        given.gave(7, key("x"), covered: true, now: 1)
        given.renamed(key("x"), key("source"), exchange: false)
        XCTAssertNil(given.other(7, than: key("source")), "the record follows the rename")
        XCTAssertEqual(given.other(7, than: key("target"))?.key, key("source"))
        given.gave(8, key("b"), covered: true, now: 1)
        given.renamed(key("source"), key("b"), exchange: true)
        XCTAssertEqual(given.other(7, than: key("a"))?.key, key("b"))
        XCTAssertEqual(given.other(8, than: key("a"))?.key, key("source"), "an exchange swaps both")
        given.renamed(key("nothing"), key("b"), exchange: false)
        XCTAssertEqual(given.other(7, than: key("a"))?.key, key("b"), "a rename of an unknown entry over it changes no record")
        given.gave(7, key("link"), covered: true, now: 2, keepingEarlier: true)
        XCTAssertEqual(given.other(7, than: key("link"))?.key, key("b"), "a link keeps the earlier entry")
    }

    func testTheRecordsStayBounded() {
        var given = GivenNames()
        for ino in 0..<UInt64(GivenNames.filesMax + 10) {
            given.gave(ino, key("n\(ino)"), covered: true, now: 1)
        }
        XCTAssertLessThanOrEqual(given.count, GivenNames.filesMax)
    }
}

/// The kernel's retry of a call whose lookup was answered ESTALE (SPEC.md §12.6, "The
/// kernel's retry").
final class StaleRetriesTests: XCTestCase {
    private func key(_ name: String, in parent: UInt64 = 2) -> NameKey { NameKey(parent: parent, name: Array(name.utf8)) }
    private let stale = GivenNames.Given(key: NameKey(parent: 2, name: Array("a".utf8)), covered: false, ns: 3)
    private let ms: UInt64 = 1_000_000

    /// The retry walks the path again from its first directory; it ends at the name answered
    /// ESTALE. Other threads are never part of it.
    func testTheRetryBeginsWithAnotherNameAndEndsAtTheNameAnsweredEstale() {
        var retries = StaleRetries()
        XCTAssertNil(retries.retry(40, key("b"), now: 1), "nothing answered ESTALE")
        retries.answered(40, key("b"), stale: stale, now: 10)
        XCTAssertNil(retries.retry(41, key("d", in: 1), now: 11), "another thread")
        XCTAssertEqual(retries.retry(40, key("d", in: 1), now: 12), stale, "the retry revalidates the directory first")
        XCTAssertEqual(retries.retry(40, key("a"), now: 13), stale, "a name the retry looks up before")
        XCTAssertEqual(retries.retry(40, key("b"), now: 14 + 500 * ms), stale, "the name answered ESTALE: still the retry")
        XCTAssertNil(retries.retry(40, key("c"), now: 15 + 500 * ms), "the retry ended there")
        XCTAssertEqual(retries.count, 0)
    }

    /// After an ESTALE answered to the revalidation of an entry the kernel holds, the same call
    /// looks the same name up at once: that lookup is still the first attempt.
    func testTheSameNameAtOnceIsStillTheFirstAttempt() {
        var retries = StaleRetries()
        retries.answered(40, key("b"), stale: stale, now: 10)
        XCTAssertNil(retries.retry(40, key("b"), now: 11))
        XCTAssertNil(retries.retry(40, key("d", in: 1), now: 12), "nothing is left to retry")
        retries.answered(40, key("b"), stale: stale, now: 13)
        XCTAssertEqual(retries.retry(40, key("d", in: 1), now: 14), stale, "the second ESTALE's retry")
    }

    /// The retry begins within `beginNs` of the ESTALE (the kernel starts it at once), ends
    /// when a lookup of it fails, and lasts at most `windowNs`.
    func testTheRetryBeginsAtOnceAndEndsWhenItsCallEndsOrTheWindowPasses() {
        var retries = StaleRetries()
        retries.answered(40, key("b"), stale: stale, now: 10)
        XCTAssertNil(retries.retry(40, key("d", in: 1), now: 11 + StaleRetries.beginNs), "a later call of the thread")
        XCTAssertEqual(retries.count, 0)
        retries.answered(40, key("b"), stale: stale, now: 20)
        XCTAssertNotNil(retries.retry(40, key("d", in: 1), now: 21))
        retries.remove(40)                                  // a lookup of the retry failed
        XCTAssertNil(retries.retry(40, key("a"), now: 22))
        retries.answered(40, key("b"), stale: stale, now: 100)
        XCTAssertNotNil(retries.retry(40, key("d", in: 1), now: 101))
        XCTAssertNil(retries.retry(40, key("a"), now: 102 + StaleRetries.windowNs), "too late")
        XCTAssertEqual(retries.count, 0)
    }

    /// Threads that never come back (their calls ended otherwise) are forgotten after the
    /// window, at another thread's lookup; at the bound every record is forgotten.
    func testTheRecordsStayBoundedAndExpire() {
        var retries = StaleRetries()
        retries.answered(40, key("b"), stale: stale, now: 10)
        XCTAssertNil(retries.retry(41, key("b"), now: 20))
        XCTAssertEqual(retries.count, 1, "still within the window")
        XCTAssertNil(retries.retry(41, key("b"), now: 20 + 2 * StaleRetries.windowNs))
        XCTAssertEqual(retries.count, 0, "pruned")
        for caller in 1...Int32(StaleRetries.callersMax + 10) {
            retries.answered(caller, key("b"), stale: stale, now: 30)
        }
        XCTAssertLessThanOrEqual(retries.count, StaleRetries.callersMax)
        XCTAssertNotNil(retries.retry(Int32(StaleRetries.callersMax + 10), key("d", in: 1), now: 31), "the newest is kept")
    }
}

/// A lookup of a name whose drop a recall asked for waits for it, a little (SPEC.md §12.6).
final class EntryDropsTests: XCTestCase {
    func testALookupWaitsForAPendingDropOfItsNameThenReportsIt() {
        let cache = LeaseCache()
        let name = Array("n".utf8)
        XCTAssertFalse(cache.dropPending(1, name, waitNs: 0))
        cache.dropsBegan(1, [name, Array("m".utf8)])
        XCTAssertFalse(cache.dropPending(2, name, waitNs: 0), "another directory")
        XCTAssertFalse(cache.dropPending(1, Array("o".utf8), waitNs: 0), "another name")
        let start = Leases.nowNs()
        XCTAssertTrue(cache.dropPending(1, name, waitNs: 20_000_000))
        XCTAssertGreaterThanOrEqual(Leases.nowNs() - start, 19_000_000, "waited for the drop")
        Thread.detachNewThread {
            usleep(20_000)
            cache.dropsEnded(1, [name, Array("m".utf8)])
        }
        XCTAssertFalse(cache.dropPending(1, name, waitNs: 5_000_000_000), "the drop went through while it waited")
        XCTAssertFalse(cache.dropPending(1, Array("m".utf8), waitNs: 0))
    }
}
